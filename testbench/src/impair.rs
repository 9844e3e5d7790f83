//! Packet impairment on the underlay, in userspace and seeded.
//!
//! This kernel has no netem, and netem's randomness cannot be seeded anyway.
//! Instead the router sends every packet it forwards through a TUN device
//! (policy routing), and this program holds each one on a timer heap: it drops,
//! duplicates, delays (with jitter) and reorders packets by draws from one
//! seeded generator, then writes them back, and the router forwards them on.
//! Rate limits use the kernel's tbf qdisc, which is deterministic.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What to do to packets. Percentages are per packet.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, clap::Args, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Impairment {
    /// Fixed delay, ms.
    #[serde(default)]
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    /// Uniform jitter around the delay, ± ms.
    #[serde(default)]
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    /// Share of packets sent at once, ahead of delayed ones, %.
    #[serde(default)]
    #[arg(long, default_value_t = 0.0)]
    pub reorder_percent: f64,
    /// Share of packets dropped, %.
    #[serde(default)]
    #[arg(long, default_value_t = 0.0)]
    pub loss_percent: f64,
    /// Share of packets sent twice, %.
    #[serde(default)]
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_percent: f64,
    /// Rate limit in each direction, Mbit/s (tbf); 0 for none.
    #[serde(default)]
    #[arg(long, default_value_t = 0.0)]
    pub rate_mbit: f64,
    /// Seed of every random choice.
    #[serde(default = "one")]
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Who impairs: the seeded userspace impairer (default, works on any
    /// kernel) or the kernel's netem qdisc where it exists.
    #[serde(default)]
    #[arg(skip)]
    pub backend: Backend,
}

/// Where packets are impaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `testbench agent impair` behind a TUN device in the router.
    #[default]
    Userspace,
    /// `tc qdisc … netem` on the router's interfaces (seeded; Linux ≥ 6.6).
    Netem,
}

fn one() -> u64 {
    1
}

impl Impairment {
    /// Whether packets need to pass through the userspace impairer.
    pub fn needs_impairer(&self) -> bool {
        self.delay_ms > 0.0
            || self.jitter_ms > 0.0
            || self.reorder_percent > 0.0
            || self.loss_percent > 0.0
            || self.duplicate_percent > 0.0
    }

    /// What is out of range in this profile: shares must be 0 to 100 %,
    /// times and rates not negative.
    pub fn out_of_range(&self) -> Vec<String> {
        let mut wrong = Vec::new();
        for (name, v) in [
            ("reorder_percent", self.reorder_percent),
            ("loss_percent", self.loss_percent),
            ("duplicate_percent", self.duplicate_percent),
        ] {
            if !(0.0..=100.0).contains(&v) {
                wrong.push(format!("{name} = {v} is out of range; the allowed values are 0 to 100"));
            }
        }
        for (name, v) in [
            ("delay_ms", self.delay_ms),
            ("jitter_ms", self.jitter_ms),
            ("rate_mbit", self.rate_mbit),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                wrong.push(format!("{name} = {v} is out of range; it must be 0 or more"));
            }
        }
        wrong
    }

    /// The `tc qdisc replace dev DEV root …` arguments for the netem backend.
    pub fn netem_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["netem".into()];
        if self.delay_ms > 0.0 || self.jitter_ms > 0.0 {
            a.extend([
                "delay".into(),
                format!("{}ms", self.delay_ms),
                format!("{}ms", self.jitter_ms),
            ]);
        }
        for (v, what) in [
            (self.reorder_percent, "reorder"),
            (self.loss_percent, "loss"),
            (self.duplicate_percent, "duplicate"),
        ] {
            if v > 0.0 {
                a.extend([what.into(), format!("{v}%")]);
            }
        }
        if self.rate_mbit > 0.0 {
            a.extend(["rate".into(), format!("{}mbit", self.rate_mbit)]);
        }
        a.extend(["seed".into(), self.seed.to_string()]);
        a
    }

    /// A short description for reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.delay_ms > 0.0 || self.jitter_ms > 0.0 {
            parts.push(format!("delay {}±{} ms", self.delay_ms, self.jitter_ms));
        }
        for (v, what) in [
            (self.reorder_percent, "reorder"),
            (self.loss_percent, "loss"),
            (self.duplicate_percent, "duplicate"),
        ] {
            if v > 0.0 {
                parts.push(format!("{what} {v}%"));
            }
        }
        if self.rate_mbit > 0.0 {
            parts.push(format!("rate {} Mbit/s", self.rate_mbit));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            let by = if self.backend == Backend::Netem {
                "netem"
            } else {
                "userspace"
            };
            format!("{}, seed {}, {by}", parts.join(", "), self.seed)
        }
    }
}

/// One packet waiting for its release time; `seq` keeps equal times in order.
type Held = Reverse<(Instant, u64, Vec<u8>)>;

/// Creates the TUN device `name` and impairs what passes through it, forever.
pub fn run(name: &str, imp: &Impairment) -> Result<()> {
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(1500)
        .enable(true)
        .build_sync()
        .with_context(|| format!("cannot create TUN device {name}"))?;
    dev.set_nonblocking(true)?;
    let mut rng = fastrand::Rng::with_seed(imp.seed);
    let mut heap: BinaryHeap<Held> = BinaryHeap::new();
    let (mut seq, mut passed, mut dropped, mut doubled) = (0u64, 0u64, 0u64, 0u64);
    let mut buf = vec![0u8; 65536];
    let mut report = Instant::now() + Duration::from_secs(1);
    println!("impairing on {name}: {}", imp.describe());
    loop {
        let now = Instant::now();
        let wait = heap.peek().map_or(Duration::from_millis(100), |Reverse((t, _, _))| {
            t.saturating_duration_since(now)
        });
        let mut pfd = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_micros().div_ceil(1000).min(100) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        while let Ok(n) = dev.recv(&mut buf) {
            if rng.f64() * 100.0 < imp.loss_percent {
                dropped += 1;
                continue;
            }
            let copies = if rng.f64() * 100.0 < imp.duplicate_percent {
                doubled += 1;
                2
            } else {
                1
            };
            for _ in 0..copies {
                let delay_ms = if rng.f64() * 100.0 < imp.reorder_percent {
                    0.0
                } else {
                    (imp.delay_ms + (rng.f64() * 2.0 - 1.0) * imp.jitter_ms).max(0.0)
                };
                let at = Instant::now() + Duration::from_secs_f64(delay_ms / 1000.0);
                seq += 1;
                heap.push(Reverse((at, seq, buf[..n].to_vec())));
            }
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse((t, _, _))| *t <= now) {
            let Reverse((_, _, packet)) = heap.pop().expect("peeked");
            if dev.send(&packet).is_ok() {
                passed += 1;
            }
        }
        if now >= report {
            println!(
                "passed {passed}, dropped {dropped}, duplicated {doubled}, held {}",
                heap.len()
            );
            report = now + Duration::from_secs(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_arguments_carry_every_setting_and_the_seed() {
        let imp = Impairment {
            delay_ms: 10.0,
            jitter_ms: 5.0,
            reorder_percent: 25.0,
            loss_percent: 5.0,
            duplicate_percent: 5.0,
            rate_mbit: 100.0,
            seed: 7,
            backend: Backend::Netem,
        };
        assert_eq!(
            imp.netem_args().join(" "),
            "netem delay 10ms 5ms reorder 25% loss 5% duplicate 5% rate 100mbit seed 7"
        );
        assert!(!Impairment::default().needs_impairer());
    }
}
