//! server-cluster's takeover of its pod's addresses, as a pure plan: the
//! steps that make every packet for the pod's IPs go to the TUN, each with
//! its inverse, and the record of what was done, kept before each change so
//! a server-cluster restarted in the same pod undoes exactly what a killed
//! one did. docs/architecture.md explains the steps.
//!
//! The record is trusted only as far as it is checked: its steps are the
//! kinds this module makes (anything else fails to parse), kernel
//! parameters are named by kind and interface (never a free-form key), old
//! values are small integers, and it names the network namespace it was made
//! in, so a record from another pod is discarded, not applied.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Routing table that sends everything to the TUN.
pub const TAKEOVER_TABLE: u32 = 4242;
/// Priority of the rule that steers pod-IP traffic into [`TAKEOVER_TABLE`].
pub const TAKEOVER_PRIORITY: u32 = 50;
/// Priority the `local` table rule moves to.
pub const LOCAL_PRIORITY: u32 = 100;
/// Metric of the on-link IPv6 prefix route put back after the pod's IPv6
/// address moves off its interface.
pub const PREFIX_ROUTE_METRIC: u32 = 4242;

/// A kernel parameter the takeover changes: which, on which interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", content = "interface", rename_all = "kebab-case")]
pub enum Sysctl {
    /// `net.ipv4.ip_forward`.
    IpForward,
    /// `net.ipv6.conf.all.forwarding`.
    Ipv6Forwarding,
    /// `net.ipv4.conf.IFACE.proxy_arp`.
    ProxyArp(String),
    /// `net.ipv4.neigh.IFACE.proxy_delay`.
    ProxyDelay(String),
    /// `net.ipv6.conf.IFACE.proxy_ndp`.
    ProxyNdp(String),
    /// `net.ipv4.conf.TUN.accept_local` (gone with the TUN).
    AcceptLocal(String),
    /// `net.ipv4.conf.TUN.rp_filter` (gone with the TUN).
    RpFilter(String),
}

impl Sysctl {
    /// Its file under /proc/sys (interface names may hold dots, so never by
    /// replacing dots in a dotted key).
    pub fn path(&self) -> PathBuf {
        let p = match self {
            Sysctl::IpForward => "net/ipv4/ip_forward".to_owned(),
            Sysctl::Ipv6Forwarding => "net/ipv6/conf/all/forwarding".to_owned(),
            Sysctl::ProxyArp(i) => format!("net/ipv4/conf/{i}/proxy_arp"),
            Sysctl::ProxyDelay(i) => format!("net/ipv4/neigh/{i}/proxy_delay"),
            Sysctl::ProxyNdp(i) => format!("net/ipv6/conf/{i}/proxy_ndp"),
            Sysctl::AcceptLocal(i) => format!("net/ipv4/conf/{i}/accept_local"),
            Sysctl::RpFilter(i) => format!("net/ipv4/conf/{i}/rp_filter"),
        };
        Path::new("/proc/sys").join(p)
    }

    /// The interface it names, if any.
    fn interface(&self) -> Option<&str> {
        match self {
            Sysctl::IpForward | Sysctl::Ipv6Forwarding => None,
            Sysctl::ProxyArp(i)
            | Sysctl::ProxyDelay(i)
            | Sysctl::ProxyNdp(i)
            | Sysctl::AcceptLocal(i)
            | Sysctl::RpFilter(i) => Some(i),
        }
    }

    /// Whether it belongs to the TUN (and so vanishes with it: no undo).
    fn on_tun(&self) -> bool {
        matches!(self, Sysctl::AcceptLocal(_) | Sysctl::RpFilter(_))
    }
}

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Set a kernel parameter (its old value is recorded first).
    Set {
        /// Which.
        sysctl: Sysctl,
        /// To what.
        value: u8,
    },
    /// `default dev TUN table 4242` (gone with the TUN).
    TunTable,
    /// `pref 50 iif IFACE to IP lookup 4242`.
    SteerRule {
        /// The pod's IPv4 address.
        to: Ipv4Addr,
    },
    /// The `local` table's rule from priority 0 to 100.
    MoveLocalRule,
    /// The IPv6 address off the pod interface; its on-link prefix back at
    /// [`PREFIX_ROUTE_METRIC`]; `IP/128 dev TUN`; a proxy neighbour entry.
    MoveV6 {
        /// The address.
        ip: Ipv6Addr,
        /// Its prefix length.
        prefix: u8,
    },
}

/// One change undone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Undo {
    /// Put a kernel parameter back.
    Set {
        /// Which.
        sysctl: Sysctl,
        /// Its old value.
        value: String,
    },
    /// Delete the steering rule.
    DelSteerRule,
    /// The `local` rule back at 0 (if missing), the one at 100 gone.
    RestoreLocalRule,
    /// The proxy entry gone, the address back (if missing), the prefix route gone.
    RestoreV6 {
        /// The address.
        ip: Ipv6Addr,
        /// Its prefix length.
        prefix: u8,
    },
}

/// The takeover of `v4` (at most one) and `v6` addresses on `interface`
/// through the TUN `tun`, in order.
pub fn plan(interface: &str, tun: &str, v4: Option<Ipv4Addr>, v6: &[(Ipv6Addr, u8)]) -> Vec<Step> {
    let set = |sysctl, value| Step::Set { sysctl, value };
    let mut steps = vec![
        set(Sysctl::IpForward, 1),
        set(Sysctl::AcceptLocal(tun.into()), 1),
        set(Sysctl::RpFilter(tun.into()), 0),
    ];
    if let Some(ip) = v4 {
        steps.extend([
            // ARP looks up the target as a packet arriving on the pod interface
            // would, so the steering rule makes the kernel stop answering for the
            // pod IP as its own; proxy ARP answers instead.
            set(Sysctl::ProxyArp(interface.into()), 1),
            // Proxy ARP answers after a random wait of up to proxy_delay.
            set(Sysctl::ProxyDelay(interface.into()), 0),
            Step::TunTable,
            Step::SteerRule { to: ip },
            Step::MoveLocalRule,
        ]);
    }
    if !v6.is_empty() {
        steps.push(set(Sysctl::Ipv6Forwarding, 1));
        steps.push(set(Sysctl::ProxyNdp(interface.into()), 1));
    }
    steps.extend(v6.iter().map(|&(ip, prefix)| Step::MoveV6 { ip, prefix }));
    steps
}

/// What undoes `done` (with the old values recorded for parameters), in the
/// order to apply it: the reverse of the doing. Changes that vanish with the
/// TUN need nothing.
pub fn undo(done: &[Done]) -> Vec<Undo> {
    done.iter()
        .rev()
        .filter_map(|d| match &d.step {
            Step::Set { sysctl, .. } if sysctl.on_tun() => None,
            Step::Set { sysctl, .. } => d.old.clone().map(|value| Undo::Set {
                sysctl: sysctl.clone(),
                value,
            }),
            Step::TunTable => None,
            Step::SteerRule { .. } => Some(Undo::DelSteerRule),
            Step::MoveLocalRule => Some(Undo::RestoreLocalRule),
            &Step::MoveV6 { ip, prefix } => Some(Undo::RestoreV6 { ip, prefix }),
        })
        .collect()
}

/// A step taken, with the old value of a parameter it set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The step.
    #[serde(flatten)]
    pub step: Step,
    /// The parameter's value before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
}

/// What a takeover has done so far, as written to disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The network namespace it was made in (the inode of
    /// `/proc/self/ns/net`): a record from another pod is not applied.
    pub netns: u64,
    /// The pod interface.
    pub interface: String,
    /// The steps taken, in order.
    pub done: Vec<Done>,
}

/// Why a record on disk is not applied.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Made in another network namespace (another pod, or a pod replaced).
    #[error("it was made in another network namespace (inode {0}, this is {1})")]
    OtherNamespace(u64, u64),
    /// Something this module never writes.
    #[error("{0}")]
    Invalid(String),
}

/// Whether `name` can be a Linux interface name.
fn interface_name_ok(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

impl Record {
    /// Checks a record read from disk against what this module writes, for
    /// the network namespace `netns`.
    pub fn check(&self, netns: u64) -> Result<(), Refused> {
        if self.netns != netns {
            return Err(Refused::OtherNamespace(self.netns, netns));
        }
        let invalid = |what: String| Err(Refused::Invalid(what));
        if !interface_name_ok(&self.interface) {
            return invalid(format!("bad interface name {:?}", self.interface));
        }
        for d in &self.done {
            match &d.step {
                Step::Set { sysctl, value } => {
                    let iface = sysctl.interface();
                    if iface.is_some_and(|i| !interface_name_ok(i)) {
                        return invalid(format!("bad interface name in {sysctl:?}"));
                    }
                    // Pod-interface parameters name the pod interface.
                    if !sysctl.on_tun() && iface.is_some_and(|i| i != self.interface) {
                        return invalid(format!("{sysctl:?} names another interface than {}", self.interface));
                    }
                    if *value > 1 {
                        return invalid(format!("{sysctl:?} set to {value}"));
                    }
                    let old_ok = |o: &String| !o.is_empty() && o.len() <= 10 && o.bytes().all(|b| b.is_ascii_digit());
                    if !sysctl.on_tun() && !d.old.as_ref().is_some_and(old_ok) {
                        return invalid(format!("{sysctl:?} has no plain old value"));
                    }
                }
                Step::MoveV6 { prefix, .. } if *prefix > 128 => {
                    return invalid(format!("an IPv6 prefix length of {prefix}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes the record to `path` atomically, readable by its owner only,
    /// never through a symbolic link.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads the record at `path`, if there is one; a file that is not a
    /// record (or is a symbolic link) is an error.
    pub fn load(path: &Path) -> Result<Option<Record>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path);
        let data = match f {
            Ok(f) => std::io::read_to_string(f).with_context(|| format!("cannot read {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => bail!("cannot read {}: {e}", path.display()),
        };
        serde_json::from_str(&data)
            .map(Some)
            .with_context(|| format!("{} is not a takeover record", path.display()))
    }
}

/// The inode of this process's network namespace.
pub fn current_netns() -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self/ns/net")
        .context("cannot read this process's network namespace")?
        .ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v6(s: &str, p: u8) -> (Ipv6Addr, u8) {
        (s.parse().unwrap(), p)
    }

    #[test]
    fn a_dual_stack_plan_and_its_undo() {
        let steps = plan(
            "eth0",
            "teletun0",
            Some("10.244.1.5".parse().unwrap()),
            &[v6("fd00::5", 64)],
        );
        assert_eq!(steps.len(), 11);
        assert_eq!(
            steps[0],
            Step::Set {
                sysctl: Sysctl::IpForward,
                value: 1
            }
        );
        assert_eq!(
            steps[6],
            Step::SteerRule {
                to: "10.244.1.5".parse().unwrap()
            }
        );
        let done: Vec<Done> = steps
            .iter()
            .map(|s| Done {
                step: s.clone(),
                old: matches!(s, Step::Set { .. }).then(|| "0".to_owned()),
            })
            .collect();
        let u = undo(&done);
        assert_eq!(
            u,
            [
                Undo::RestoreV6 {
                    ip: "fd00::5".parse().unwrap(),
                    prefix: 64
                },
                Undo::Set {
                    sysctl: Sysctl::ProxyNdp("eth0".into()),
                    value: "0".into()
                },
                Undo::Set {
                    sysctl: Sysctl::Ipv6Forwarding,
                    value: "0".into()
                },
                Undo::RestoreLocalRule,
                Undo::DelSteerRule,
                Undo::Set {
                    sysctl: Sysctl::ProxyDelay("eth0".into()),
                    value: "0".into()
                },
                Undo::Set {
                    sysctl: Sysctl::ProxyArp("eth0".into()),
                    value: "0".into()
                },
                Undo::Set {
                    sysctl: Sysctl::IpForward,
                    value: "0".into()
                },
            ]
        );
        assert_eq!(
            Sysctl::ProxyArp("eth0.100".into()).path(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/proxy_arp")
        );
    }

    #[test]
    fn only_checked_records_are_applied() {
        let good = Record {
            netns: 7,
            interface: "eth0".into(),
            done: vec![Done {
                step: Step::Set {
                    sysctl: Sysctl::ProxyArp("eth0".into()),
                    value: 1,
                },
                old: Some("0".into()),
            }],
        };
        assert_eq!(good.check(7), Ok(()));
        assert_eq!(good.check(8), Err(Refused::OtherNamespace(7, 8)));
        let mut other_iface = good.clone();
        other_iface.done[0].step = Step::Set {
            sysctl: Sysctl::ProxyArp("lo".into()),
            value: 1,
        };
        assert!(other_iface.check(7).is_err());
        let mut evil_old = good.clone();
        evil_old.done[0].old = Some("|/bin/sh".into());
        assert!(evil_old.check(7).is_err());
        let mut dotted = good.clone();
        dotted.interface = "..".into();
        assert!(dotted.check(7).is_err());
        // A free-form key is not a step this module knows: it does not parse.
        let text = r#"{"netns":7,"interface":"eth0","done":[{"step":"set","sysctl":{"name":"kernel.core_pattern"},"value":1,"old":"core"}]}"#;
        assert!(serde_json::from_str::<Record>(text).is_err());
        let text = r#"{"netns":7,"interface":"eth0","done":[],"sysctls":[["kernel.core_pattern","|x"]]}"#;
        assert!(serde_json::from_str::<Record>(text).is_err());
    }

    #[test]
    fn records_are_written_privately_and_never_through_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("teletun-takeover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("takeover.json");
        let r = Record {
            netns: 1,
            interface: "eth0".into(),
            done: vec![],
        };
        r.save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Record::load(&path).unwrap(), Some(r.clone()));
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(Record::load(&link).is_err(), "a link is not followed");
        assert_eq!(Record::load(&dir.join("none.json")).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        /// Every plan's recorded steps pass the check, and the undo restores
        /// every parameter set outside the TUN, in reverse order.
        #[test]
        fn plans_check_and_undo(v4 in proptest::option::of(any::<u32>()), n6 in 0usize..3, iface in "[a-z][a-z0-9.]{0,8}") {
            let v6: Vec<(Ipv6Addr, u8)> = (0..n6).map(|i| (Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16 + 1), 64)).collect();
            let steps = plan(&iface, "teletun0", v4.map(Ipv4Addr::from), &v6);
            let done: Vec<Done> = steps.iter().map(|s| Done { step: s.clone(), old: matches!(s, Step::Set { .. }).then(|| "0".to_owned()) }).collect();
            let r = Record { netns: 3, interface: iface.clone(), done: done.clone() };
            prop_assert_eq!(r.check(3), Ok(()));
            let u = undo(&done);
            let restored: Vec<&Sysctl> = u.iter().filter_map(|x| match x { Undo::Set { sysctl, .. } => Some(sysctl), _ => None }).collect();
            let set: Vec<&Sysctl> = steps.iter().rev().filter_map(|s| match s { Step::Set { sysctl, .. } if !sysctl.on_tun() => Some(sysctl), _ => None }).collect();
            prop_assert_eq!(restored, set);
            prop_assert_eq!(u.iter().filter(|x| matches!(x, Undo::RestoreV6 { .. })).count(), n6);
        }
    }
}
