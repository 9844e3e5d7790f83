//! The `teletun` binary: parse the command line, run a role, report one line on failure.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use teletun::cli::{self, Cli, Command};
use teletun::roles::{client, server_cluster, server_external};
use teletun::tunnel::Transport;
use teletun::{keys, roles};

fn main() -> ExitCode {
    // A bug is reported in one line, not as a backtrace; the data plane turns a
    // thread's panic into the session's end with that line's message.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "teletun: internal error in {}: {}{location} (please report it)",
            thread.name().unwrap_or("a thread"),
            teletun::plane::panic_message(info.payload())
        );
    }));
    let cli = match Cli::try_parse_from(cli::normalize_args(std::env::args_os())) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first paragraph, joined, without its own "error: " prefix.
            let text = e.render().to_string();
            let first = text.split("\n\n").next().unwrap_or("invalid arguments");
            let joined = first.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("teletun: {} (try --help)", joined.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("teletun: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match (verbose, std::env::var("TELETUN_LOG").ok().as_deref()) {
        (0, Some("debug")) | (1, _) => tracing::Level::DEBUG,
        (0, Some("trace")) | (2.., _) => tracing::Level::TRACE,
        (0, Some("warn")) => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// server-external faces strangers: its accept loop and TLS handshakes get
/// two worker threads, so a burst of handshakes cannot stall the rest.
fn network_facing_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `teletun status`: every running client's report, as text or JSON.
async fn print_status(json: bool, verbose: bool) -> Result<()> {
    use teletun::status::{self, Answer};
    let answers = status::query_all().await;
    let now = status::unix_now();
    let mut reports = Vec::new();
    for a in answers {
        match a {
            Answer::Report(r) => reports.push(*r),
            Answer::Stale(path) => eprintln!("teletun: removed {}: its client is gone", path.display()),
            Answer::Broken(path, why) => eprintln!("teletun: {}: {why}", path.display()),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else if reports.is_empty() {
        println!("no teletun client runs on this machine");
    } else {
        for r in &reports {
            println!("{}", status::render(r, verbose, now));
        }
    }
    Ok(())
}

/// The link key, if one is given; without, a warning that the link is open
/// to any process of the peer's uid on the node.
fn load_link_key(path: Option<&std::path::Path>, allow_insecure: bool) -> Result<Option<keys::LinkKey>> {
    match path {
        Some(p) => Ok(Some(keys::load_link_key(p, allow_insecure)?)),
        None => {
            tracing::warn!(
                "no --link-key: the AF_UNIX link is not authenticated, so another pair's server on this node could link up with this one; give both servers the pair's key (`teletun keygen --link`)"
            );
            Ok(None)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen(a) => roles::keygen::run(&a.out, a.link),
        Command::Cleanup => runtime()?.block_on(roles::cleanup::run()),
        Command::Status(a) => runtime()?.block_on(print_status(a.json, cli.verbose > 0)),
        Command::Guard => runtime()?.block_on(roles::guard::run()),
        Command::Client(a) => {
            let identity = keys::load_identity(&a.client_privkey, a.insecure_key_permissions)?;
            let own = keys::load_pinned(&a.client_pubkey)?;
            keys::ensure_pair(&identity, &own, &a.client_privkey)?;
            let server_key = keys::load_pinned(&a.server_pubkey)?;
            if a.pod.is_none() && a.server_address.is_none() {
                bail!("which server? pass -pod=NAME (found through the kubeconfig) or --server-address ADDR");
            }
            let kube = a.pod.map(|pod| client::KubeTarget {
                options: teletun::kube::KubeOptions {
                    kubeconfig: a.kubeconfig,
                    context: a.context,
                    namespace: a.namespace,
                    allow_insecure: a.allow_insecure_kubeconfig,
                },
                pod,
            });
            let address = a.server_address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let config = client::ClientConfig {
                server: SocketAddr::new(address, a.port),
                kube,
                allow_conflicting: a.allow_conflicting,
                allow_public_networks: a.allow_public_networks,
                identity,
                identity_path: a.client_privkey,
                server_key,
                routes: a.route,
                tun_name: a.tun_name,
                no_dns: a.no_dns,
                cluster_domains: a.cluster_domain,
                transport: Transport::default(),
                give_up_after: a.give_up_after,
            };
            runtime()?.block_on(client::run(config))
        }
        Command::ServerExternal(a) => {
            let identity = keys::load_identity(&a.server_privkey, a.insecure_key_permissions)?;
            let own = keys::load_pinned(&a.server_pubkey)?;
            keys::ensure_pair(&identity, &own, &a.server_privkey)?;
            let client_key = keys::load_pinned(&a.client_pubkey)?;
            let link_key = load_link_key(a.link_key.as_deref(), a.insecure_key_permissions)?;
            let listen = cli::listen_addr(&a);
            let v6 = listen.is_ipv6();
            let config = server_external::ServerExternalConfig {
                listen,
                identity,
                client_key,
                sockfile: a.sockfile,
                link_key,
                // SAFETY: geteuid has no preconditions.
                peer_uid: a.peer_uid.unwrap_or_else(|| unsafe { libc::geteuid() }),
                path_mtu: teletun::io::udp::udp_payload(usize::from(a.path_mtu), v6),
                transport: Transport::default(),
            };
            network_facing_runtime()?.block_on(server_external::run(config))
        }
        Command::ServerCluster(a) => runtime()?.block_on(server_cluster::run(server_cluster::ServerClusterConfig {
            link_key: load_link_key(a.link_key.as_deref(), a.insecure_key_permissions)?,
            sockfile: a.sockfile,
            interface: a.interface,
            resolv_conf: a.resolv_conf,
            mtu: a.mtu,
            transport: Transport::default(),
            state_dir: a.state_dir,
            // SAFETY: geteuid has no preconditions.
            peer_uid: a.peer_uid.unwrap_or_else(|| unsafe { libc::geteuid() }),
        })),
    }
}
