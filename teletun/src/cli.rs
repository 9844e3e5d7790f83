//! Command-line interface. Flags are accepted as the seed writes them
//! (`-pod=NAME`, Go style) and GNU style (`--pod NAME`, `--pod=NAME`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

/// An L3 VPN that makes this machine one pod of a Kubernetes cluster.
#[derive(Debug, Parser)]
#[command(name = "teletun", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log more (repeat for even more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The roles and tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect this machine to a cluster as the server-cluster pod.
    Client(ClientArgs),
    /// Run the externally reachable half of the server (hostNetwork pod).
    ServerExternal(ServerExternalArgs),
    /// Run the in-cluster half of the server (the pod the client becomes).
    ServerCluster(ServerClusterArgs),
    /// Undo what dead `teletun client` instances left behind (DNS entries).
    Cleanup,
    /// Show what each running client on this machine is doing (`-v`: list routes).
    Status(StatusArgs),
    /// Create a key pair: PREFIX.key (private, 0600) and PREFIX.pub.
    Keygen(KeygenArgs),
    /// Internal: the client's cleanup guard (reads instructions on stdin).
    #[command(hide = true)]
    Guard,
}

/// `teletun client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// kubeconfig [default: as kubectl: KUBECONFIG, then ~/.kube/config].
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The server-external pod: the client dials its node and routes the
    /// cluster's networks, both found through the Kubernetes API.
    #[arg(long, value_name = "PODNAME")]
    pub pod: Option<String>,
    /// The pod's namespace [default: the kubeconfig context's].
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// The kubeconfig context [default: its current context].
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Use a kubeconfig whose cluster sets insecure-skip-tls-verify (refused
    /// otherwise: the API decides which server is dialled and what is routed).
    #[arg(long)]
    pub allow_insecure_kubeconfig: bool,
    /// Route cluster networks even where they overlap this machine's routes.
    #[arg(long)]
    pub allow_conflicting: bool,
    /// Route public networks the Kubernetes API names, and take on a public
    /// pod address; by default only private-use space (RFC 1918, 100.64/10,
    /// 198.18/15, fc00::/7) is, so a broken or hostile cluster cannot take
    /// this machine's internet traffic.
    #[arg(long)]
    pub allow_public_networks: bool,
    /// server-external's port (TCP and UDP).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The server's public key (PREFIX.pub from `teletun keygen`).
    #[arg(long, value_name = "FILE")]
    pub server_pubkey: PathBuf,
    /// Our public key.
    #[arg(long, value_name = "FILE")]
    pub client_pubkey: PathBuf,
    /// Our private key.
    #[arg(long, value_name = "FILE")]
    pub client_privkey: PathBuf,
    /// Use a private key that others may read (refused otherwise, as ssh does).
    #[arg(long)]
    pub insecure_key_permissions: bool,
    /// Dial this address instead of server-external's node (for nodes that are
    /// not directly reachable); without -pod, no Kubernetes API is used.
    #[arg(long, value_name = "ADDR")]
    pub server_address: Option<IpAddr>,
    /// Also route this network into the tunnel (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub route: Vec<IpNet>,
    /// Do not register the cluster's DNS.
    #[arg(long)]
    pub no_dns: bool,
    /// Let the cluster's DNS answer for this domain (repeatable). Without it,
    /// only a cluster domain below a private-use suffix (`cluster.local`,
    /// `*.internal`, `*.home.arpa`, …) is sent to the cluster: a public one
    /// would take this machine's lookups of real names.
    #[arg(long, value_name = "DOMAIN", value_parser = parse_cluster_domain)]
    pub cluster_domain: Vec<String>,
    /// TUN device name; `%d` is replaced by the first free number.
    #[arg(long, value_name = "NAME", default_value = "tel%d")]
    pub tun_name: String,
    /// Stop trying to repair a lost session after this long (e.g. `30s`,
    /// `5m`, `2h`) and exit; by default the client keeps trying until
    /// stopped, or until the server refuses it for good (a key mismatch, a
    /// pod that is gone).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub give_up_after: Option<std::time::Duration>,
}

/// A domain the user lets the cluster answer for: two labels or more of
/// letters, digits and hyphens; lower case, without the trailing dot.
pub fn parse_cluster_domain(text: &str) -> Result<String, String> {
    let d = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !d.split('.').all(label_ok) || d.len() > 253 {
        return Err(format!(
            "{text:?} is not a domain name (letters, digits, hyphens and dots)"
        ));
    }
    if !d.contains('.') {
        return Err(format!(
            "{d} is a top-level domain: every name under it would go to the cluster; name the cluster's own domain (k8s.example.com)"
        ));
    }
    Ok(d)
}

/// A duration as a number with a unit: `500ms`, `30s`, `5m`, `2h` (a bare
/// number is seconds).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write a whole number and a unit, e.g. 30s, 5m, 2h"))?;
    let seconds = match unit {
        "ms" => return Ok(std::time::Duration::from_millis(n)),
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        other => return Err(format!("unknown unit `{other}` in `{text}`: use ms, s, m or h")),
    };
    Ok(std::time::Duration::from_secs(seconds))
}

/// `teletun status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the reports as JSON, one object per client in a list.
    #[arg(long)]
    pub json: bool,
}

/// `teletun server-external`.
#[derive(Debug, Args)]
pub struct ServerExternalArgs {
    /// Port to listen on (TCP and UDP).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Our public key.
    #[arg(long, value_name = "FILE")]
    pub server_pubkey: PathBuf,
    /// Our private key.
    #[arg(long, value_name = "FILE")]
    pub server_privkey: PathBuf,
    /// Use a private key that others may read (refused otherwise, as ssh does).
    #[arg(long)]
    pub insecure_key_permissions: bool,
    /// The one client public key to accept.
    #[arg(long, value_name = "FILE")]
    pub client_pubkey: PathBuf,
    /// server-cluster's AF_UNIX socket.
    #[arg(long, value_name = "FILE")]
    pub sockfile: PathBuf,
    /// The pair's link key (`teletun keygen --link`), which server-cluster
    /// must hold too: each proves it to the other before the link carries
    /// anything. Without it the link is not authenticated (a warning says so).
    #[arg(long, value_name = "FILE")]
    pub link_key: Option<PathBuf>,
    /// The only uid server-cluster may run as [default: server-external's own].
    #[arg(long, value_name = "UID")]
    pub peer_uid: Option<u32>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "::")]
    pub listen_address: IpAddr,
    /// IP MTU of the path to clients; the tunnel fits its records into it.
    #[arg(long, value_name = "BYTES", default_value_t = 1500, value_parser = clap::value_parser!(u16).range(1280..))]
    pub path_mtu: u16,
}

/// `teletun server-cluster`.
#[derive(Debug, Args)]
pub struct ServerClusterArgs {
    /// The AF_UNIX socket to listen on.
    #[arg(long, value_name = "FILE")]
    pub sockfile: PathBuf,
    /// The pod's network interface [default: the one with the default route].
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,
    /// The resolv.conf to hand to the client.
    #[arg(long, value_name = "FILE", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// TUN MTU [default: the pod interface's MTU minus tunnel overhead].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(1280..))]
    pub mtu: Option<u16>,
    /// Where server-cluster records its takeover, so that one restarted in
    /// the same pod can undo what a killed one left: a directory of this pod's
    /// own that outlives container restarts (an emptyDir), not the one shared
    /// with server-external.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/teletun")]
    pub state_dir: PathBuf,
    /// The only uid that may connect to the socket: server-external's
    /// [default: server-cluster's own].
    #[arg(long, value_name = "UID")]
    pub peer_uid: Option<u32>,
    /// The pair's link key (`teletun keygen --link`), which server-external
    /// must hold too: each proves it to the other before the link carries
    /// anything. Without it the link is not authenticated (a warning says so).
    #[arg(long, value_name = "FILE")]
    pub link_key: Option<PathBuf>,
    /// Use a link key that others may read (refused otherwise, as ssh does).
    #[arg(long)]
    pub insecure_key_permissions: bool,
}

/// `teletun keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write PREFIX.key and PREFIX.pub.
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
    /// Write only PREFIX.key, a new link key: the secret one pair's
    /// server-external and server-cluster share (--link-key), not a key pair.
    #[arg(long)]
    pub link: bool,
}

/// Rewrites Go-style long flags (`-pod=x`, `-port 8`) to GNU style. A single
/// dash followed by two or more characters is a long flag: TeleTUN has no
/// bundled short flags. Everything after `--` is left alone.
pub fn normalize_args<I: IntoIterator<Item = std::ffi::OsString>>(args: I) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut rest_literal = false;
    for (i, arg) in args.into_iter().enumerate() {
        let s = arg.to_string_lossy();
        if i == 0 || rest_literal {
            out.push(arg);
            continue;
        }
        if s == "--" {
            rest_literal = true;
            out.push(arg);
            continue;
        }
        let name = s.split('=').next().unwrap_or("");
        let go_style = name.len() > 2
            && name.starts_with('-')
            && !name.starts_with("--")
            && name[1..].chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && name.as_bytes()[1].is_ascii_alphabetic();
        if go_style {
            let mut fixed = std::ffi::OsString::from("-");
            fixed.push(&arg);
            out.push(fixed);
        } else {
            out.push(arg);
        }
    }
    out
}

/// The socket address server-external listens on.
pub fn listen_addr(args: &ServerExternalArgs) -> SocketAddr {
    SocketAddr::new(args.listen_address, args.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(normalize_args(args.iter().map(std::ffi::OsString::from)))
    }

    #[test]
    fn seed_usage_lines_parse() {
        let c = parse(&[
            "teletun",
            "client",
            "-kubeconfig=/k",
            "-pod=srv",
            "-port=8443",
            "-server-pubkey=s.pub",
            "-client-pubkey=c.pub",
            "-client-privkey=c.key",
        ])
        .unwrap();
        let Command::Client(a) = c.command else {
            panic!("not client")
        };
        assert_eq!((a.pod.as_deref(), a.port), (Some("srv"), 8443));
        assert_eq!(a.kubeconfig, Some(PathBuf::from("/k")));
        let c = parse(&[
            "teletun",
            "server-external",
            "-port=1",
            "-server-pubkey=s.pub",
            "-server-privkey=s.key",
            "-client-pubkey=c.pub",
            "-sockfile=/run/x.sock",
        ])
        .unwrap();
        assert!(matches!(c.command, Command::ServerExternal(_)));
        let c = parse(&["teletun", "server-cluster", "-sockfile=/run/x.sock"]).unwrap();
        assert!(matches!(c.command, Command::ServerCluster(_)));
        assert!(matches!(
            parse(&["teletun", "cleanup"]).unwrap().command,
            Command::Cleanup
        ));
    }

    #[test]
    fn gnu_and_go_styles_mix() {
        let c = parse(&[
            "teletun",
            "client",
            "--port",
            "9",
            "-server-pubkey",
            "s",
            "--client-pubkey=c",
            "-client-privkey=k",
            "--server-address",
            "10.0.0.1",
            "-route=10.96.0.0/12",
            "--route",
            "fd00::/64",
            "-v",
        ])
        .unwrap();
        assert_eq!(c.verbose, 1);
        let Command::Client(a) = c.command else {
            panic!("not client")
        };
        assert_eq!(a.route.len(), 2);
        assert_eq!(a.server_address, Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(parse(&[
            "teletun",
            "client",
            "-port=0",
            "-server-pubkey=s",
            "-client-pubkey=c",
            "-client-privkey=k"
        ])
        .is_err());
        assert!(parse(&["teletun", "client", "-port=99999"]).is_err());
        assert!(parse(&["teletun", "client", "-port=x"]).is_err());
        assert!(parse(&[
            "teletun",
            "client",
            "-port=1",
            "-server-pubkey=s",
            "-client-pubkey=c",
            "-client-privkey=k",
            "-route=banana"
        ])
        .is_err());
        assert!(parse(&["teletun", "frobnicate"]).is_err());
    }

    #[test]
    fn durations_have_units_and_bad_ones_say_how() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").unwrap_err().contains("e.g. 30s"));
        assert!(parse_duration("3d").unwrap_err().contains("unknown unit `d`"));
        assert!(parse_duration("").is_err());
    }
}
