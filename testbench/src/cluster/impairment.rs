//! Impairing the underlay in the router: the seeded userspace impairer (a TUN
//! every forwarded packet detours through, by policy routing) for delay,
//! jitter, reorder, loss and duplication; tbf for rate; netem where a kernel
//! has it.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use ipnet::IpNet;

use crate::exec::Background;
use crate::impair::{Backend, Impairment};
use crate::netlink::Via;
use crate::netns::Netns;

/// The impairer's background process name.
pub const PROCESS: &str = "impairer";
/// The router's interfaces that carry the underlay.
const DEVICES: [&str; 2] = ["to-laptop", "nodes"];
/// Policy rules that send forwarded packets through the impairer, by input interface.
const RULES: [(u32, &str); 2] = [(100, "to-laptop"), (101, "nodes")];
/// The table whose default route is the impairer's TUN.
const TABLE: u32 = 100;

/// Impairs the router's forwarding from now on; returns the impairer process
/// if the profile needs one. Call [`clear`] first to replace an impairment.
pub fn apply(router: &Netns, dir: &Path, imp: &Impairment) -> Result<Option<Background>> {
    if imp.backend == Backend::Netem {
        netem(router, imp)?;
        return Ok(None);
    }
    let mut impairer = None;
    if imp.needs_impairer() {
        let me = std::env::current_exe()?;
        let mut cmd = router.cmd(&me);
        cmd.args(["agent", "impair", "--tun", "imp0"])
            .arg(format!("--delay-ms={}", imp.delay_ms))
            .arg(format!("--jitter-ms={}", imp.jitter_ms))
            .arg(format!("--reorder-percent={}", imp.reorder_percent))
            .arg(format!("--loss-percent={}", imp.loss_percent))
            .arg(format!("--duplicate-percent={}", imp.duplicate_percent))
            .arg(format!("--seed={}", imp.seed));
        let mut p = Background::spawn(PROCESS, cmd, &dir.join("impairer.log"))?;
        p.wait_for_log("impairing", Duration::from_secs(10))?;
        let netlink = router.netlink()?;
        for (priority, iif) in RULES {
            netlink.add_rule(priority, iif, TABLE)?;
        }
        let default: IpNet = "0.0.0.0/0".parse().expect("a network");
        netlink.add_route(default, Via::Device("imp0"), Some(TABLE))?;
        router.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        router.sysctl("net.ipv4.conf.imp0.rp_filter", "0")?;
        impairer = Some(p);
    }
    if imp.rate_mbit > 0.0 {
        let rate = format!("{}mbit", imp.rate_mbit);
        for dev in DEVICES {
            router.run(
                "tc",
                &[
                    "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", "256kb", "latency", "100ms",
                ],
            )?;
        }
    }
    Ok(impairer)
}

fn netem(router: &Netns, imp: &Impairment) -> Result<()> {
    // Probe on the router's loopback: does this kernel have netem at all?
    if router
        .run("tc", &["qdisc", "add", "dev", "lo", "root", "netem"])
        .is_err()
    {
        bail!("this kernel has no netem (sch_netem); use the seeded userspace impairer (backend = \"userspace\")");
    }
    router.run("tc", &["qdisc", "del", "dev", "lo", "root"])?;
    for dev in DEVICES {
        let mut args: Vec<String> = ["qdisc", "replace", "dev", dev, "root"].map(String::from).to_vec();
        args.extend(imp.netem_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = router.run("tc", &args) {
            if format!("{e:#}").contains("\"seed\"") {
                bail!("this tc cannot seed netem (iproute2 6.5 or later can); use backend = \"userspace\"");
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Ends an impairment: stops the impairer (its TUN and so its route go with
/// it), removes its rules and any qdisc.
pub fn clear(router: &Netns, impairer: Option<Background>) {
    if let Some(mut p) = impairer {
        p.kill();
        if let Ok(netlink) = router.netlink() {
            for (priority, _) in RULES {
                let _ = netlink.del_rule(priority);
            }
        }
    }
    for dev in DEVICES {
        let _ = router.run("tc", &["qdisc", "del", "dev", dev, "root"]);
    }
}
