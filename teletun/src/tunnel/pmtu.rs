//! How large a packet the path carries, found with the tunnel's own records
//! (in the spirit of RFC 8899, DPLPMTUD): a path whose ICMP "too big" is
//! filtered carries small packets and silently loses large ones, so the
//! kernel's path MTU cannot be trusted.
//!
//! At the start of a session each side sends rounds of padded probe records
//! at sizes from its largest down to [`FLOOR`], and each side reports, in a
//! small record, the largest probe that reached it. A side whose largest
//! probe was reported is done at once (most paths); otherwise after
//! [`SETTLE_AFTER`] it sends nothing larger than the largest reported, or,
//! with no report at all (a peer that does not probe), keeps its largest.
//! Both sides clamp the MSS of TCP connections through the tunnel to what
//! passes both ways, and to what [`FLOOR`] allows until they know; the
//! client lowers its TUN device's MTU.
//!
//! The records (TeleTUN extensions, application data that is never an IP
//! packet: its first byte is not 4 or 6 in the version nibble):
//! - probe: `01` then padding to the size probed;
//! - report: `02` and the largest probe size received, 2 bytes big-endian.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::Time;

/// A probe's first byte.
pub const PROBE: u8 = 1;
/// A report's first byte.
pub const REPORT: u8 = 2;
/// The smallest probe (an IP packet of 1100 bytes: a 1200-byte path, RFC
/// 8899's base, less the tunnel's own headers, with room to spare).
pub const FLOOR: usize = 1100;
/// Probe sizes step down from the largest by this much.
const STEP: usize = 32;
/// Rounds of probes (a lost probe gets two more chances), this far apart.
const ROUNDS: u32 = 3;
const ROUND_INTERVAL: Duration = Duration::from_millis(100);
/// The limit is fixed this long after the session starts, if the largest
/// probe was not reported before.
pub const SETTLE_AFTER: Duration = Duration::from_millis(500);

/// What both halves of a session know about the path, shared without locks.
#[derive(Debug, Default)]
pub struct PathState {
    /// The largest packet the local path allows (the largest probe).
    max: usize,
    /// The largest probe of the peer's that reached us (0: none yet).
    received: AtomicUsize,
    /// What we last reported of it.
    reported: AtomicUsize,
    /// The largest probe of ours the peer reported (0: none yet).
    peer_received: AtomicUsize,
    /// Our sending limit, once settled (0: not yet).
    limit: AtomicUsize,
}

impl PathState {
    /// For packets of at most `max` bytes on the local path.
    pub fn new(max: usize) -> Self {
        PathState {
            max,
            ..Default::default()
        }
    }

    /// A probe of `size` bytes arrived.
    pub fn probe_arrived(&self, size: usize) {
        self.received.fetch_max(size, Ordering::Relaxed);
    }

    /// The peer reported the largest of our probes it received.
    pub fn peer_reported(&self, size: usize) {
        self.peer_received.fetch_max(size, Ordering::Relaxed);
    }

    /// A report owed to the peer (what arrived grew since the last), marked sent.
    pub fn take_report(&self) -> Option<usize> {
        let received = self.received.load(Ordering::Relaxed);
        let before = self.reported.swap(received, Ordering::Relaxed);
        (received > before).then_some(received)
    }

    /// Our sending limit, once settled.
    pub fn limit(&self) -> Option<usize> {
        match self.limit.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// The largest packet that passes both ways, once our limit is settled
    /// and a probe of the peer's has arrived.
    pub fn both_ways(&self) -> Option<usize> {
        let received = self.received.load(Ordering::Relaxed);
        self.settled_limit().filter(|_| received > 0).map(|l| l.min(received))
    }

    /// Our sending limit, as soon as it is known: settled, or our largest
    /// probe reported (nothing to find).
    fn settled_limit(&self) -> Option<usize> {
        self.limit()
            .or_else(|| (self.max > 0 && self.peer_received.load(Ordering::Relaxed) >= self.max).then_some(self.max))
    }

    /// The largest packet a TCP connection should be told of: what passes
    /// both ways; [`FLOOR`] while that is not known yet (a connection opened
    /// then keeps its MSS, so it must be one that passes).
    pub fn clamp_limit(&self) -> usize {
        match self.settled_limit() {
            None => FLOOR,
            Some(limit) => match self.received.load(Ordering::Relaxed) {
                0 => limit,
                received => limit.min(received),
            },
        }
    }
}

/// The sending side's search.
#[derive(Debug)]
pub struct Prober {
    /// The largest packet the local path allows.
    max: usize,
    started: Time,
    rounds_sent: u32,
    settled: bool,
}

impl Prober {
    /// Starts at `now` for packets up to `max`.
    pub fn new(now: Time, max: usize) -> Self {
        Prober {
            max,
            started: now,
            rounds_sent: 0,
            settled: false,
        }
    }

    /// When to call [`Self::probes_due`] or [`Self::settle`] next (`None`: never).
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.settled {
            None
        } else if self.rounds_sent < ROUNDS {
            Some(self.started + ROUND_INTERVAL * self.rounds_sent)
        } else {
            Some(self.started + SETTLE_AFTER)
        }
    }

    /// The sizes of a round of probes due at `now`, smallest first (empty if
    /// none is due). Ascending, so that no two go out in one UDP GSO send: a
    /// router that refuses a GSO packet's full-size segments drops its
    /// shorter last one with them, and that one would look too large.
    pub fn probes_due(&mut self, now: Time) -> impl Iterator<Item = usize> {
        let due = !self.settled && self.rounds_sent < ROUNDS && now >= self.started + ROUND_INTERVAL * self.rounds_sent;
        if due {
            self.rounds_sent += 1;
        }
        let max = self.max;
        let count = if due && max >= FLOOR {
            (max - FLOOR) / STEP + 1
        } else {
            0
        };
        (0..count).rev().map(move |k| max - k * STEP)
    }

    /// Fixes the limit once it is time: the largest probe the peer reported,
    /// or (no report: a peer that does not probe) `max`. Returns it the once.
    pub fn settle(&mut self, now: Time, path: &PathState) -> Option<usize> {
        let reported = path.peer_received.load(Ordering::Relaxed);
        if self.settled || (now < self.started + SETTLE_AFTER && reported < self.max) {
            return None;
        }
        self.settled = true;
        let limit = if reported == 0 {
            self.max
        } else {
            reported.min(self.max)
        };
        path.limit.store(limit, Ordering::Relaxed);
        Some(limit)
    }
}

/// Lowers the MSS option of a TCP SYN in `packet` (an IPv4 or IPv6 packet)
/// so that segments fit in packets of `limit` bytes, and updates the TCP
/// checksum (RFC 1624). Returns whether it changed anything.
pub fn clamp_mss(packet: &mut [u8], limit: usize) -> bool {
    let (header, headers) = match packet.first().map(|b| b >> 4) {
        // Not a fragment (offset 0), protocol TCP.
        Some(4) if packet.len() >= 20 && packet[9] == 6 && u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff == 0 => {
            (usize::from(packet[0] & 0x0f) * 4, 40)
        }
        // TCP right after the fixed header (no extension headers).
        Some(6) if packet.len() >= 40 && packet[6] == 6 => (40, 60),
        _ => return false,
    };
    let Some(mss) = limit.checked_sub(headers).and_then(|m| u16::try_from(m).ok()) else {
        return false;
    };
    let Some(tcp) = packet.get_mut(header..) else {
        return false;
    };
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return false;
    }
    let options_end = usize::from(tcp[12] >> 4) * 4;
    if options_end > tcp.len() {
        return false;
    }
    let mut i = 20;
    while i + 1 < options_end {
        match tcp[i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let len = usize::from(tcp[i + 1]);
                if len < 2 || i + len > options_end {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= mss {
                        return false;
                    }
                    let new = mss.to_be_bytes();
                    let mut sum = u32::from(!u16::from_be_bytes([tcp[16], tcp[17]]));
                    for (k, byte) in new.iter().enumerate() {
                        let at = i + 2 + k;
                        // A byte at an even offset is the high half of its 16-bit word.
                        let weight = |b: u8| if at % 2 == 0 { u32::from(b) << 8 } else { u32::from(b) };
                        sum += 0xffff - weight(tcp[at]) + weight(*byte);
                        tcp[at] = *byte;
                    }
                    while sum > 0xffff {
                        sum = (sum & 0xffff) + (sum >> 16);
                    }
                    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::checksum;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn three_rounds_of_a_ladder_then_the_reported_limit() {
        let t0 = Duration::from_secs(10);
        let path = PathState::new(1435);
        assert_eq!(path.clamp_limit(), FLOOR, "the floor until the path is known");
        let mut p = Prober::new(t0, 1435);
        let round: Vec<usize> = p.probes_due(t0).collect();
        assert_eq!(round.last(), Some(&1435));
        assert!(round.windows(2).all(|w| w[0] < w[1]), "ascending: never one GSO send");
        assert!(round[0] >= FLOOR && round.len() == (1435 - FLOOR) / STEP + 1);
        assert_eq!(p.probes_due(t0 + MS).count(), 0, "one round at a time");
        assert_eq!(p.poll_timeout(), Some(t0 + ROUND_INTERVAL));
        assert_eq!(p.probes_due(t0 + ROUND_INTERVAL).count(), round.len());
        assert_eq!(p.probes_due(t0 + ROUND_INTERVAL * 2).count(), round.len());
        assert_eq!(p.poll_timeout(), Some(t0 + SETTLE_AFTER));
        assert_eq!(p.settle(t0 + SETTLE_AFTER - MS, &path), None);
        // The peer saw probes up to 1211 (a 1280-byte path).
        path.peer_reported(1179);
        path.peer_reported(1211);
        assert_eq!(p.settle(t0 + SETTLE_AFTER, &path), Some(1211));
        assert_eq!((p.poll_timeout(), path.limit()), (None, Some(1211)));
        assert_eq!(path.both_ways(), None, "nothing of the peer's arrived yet");
        assert_eq!(path.clamp_limit(), 1211);
        path.probe_arrived(1243);
        assert_eq!(path.both_ways(), Some(1211));
        assert_eq!(path.clamp_limit(), 1211);
    }

    #[test]
    fn a_path_that_carries_the_largest_is_known_at_the_first_report() {
        let path = PathState::new(1435);
        let mut p = Prober::new(Duration::ZERO, 1435);
        assert_eq!(p.probes_due(Duration::ZERO).last(), Some(1435));
        path.probe_arrived(1435);
        path.peer_reported(1435);
        // Before any timer: the clamp and both ways know it already.
        assert_eq!((path.clamp_limit(), path.both_ways()), (1435, Some(1435)));
        assert_eq!(p.settle(ROUND_INTERVAL, &path), Some(1435), "settled at the next look");
    }

    #[test]
    fn without_a_report_the_largest_stays() {
        let path = PathState::new(1435);
        let mut p = Prober::new(Duration::ZERO, 1435);
        assert_eq!(p.settle(SETTLE_AFTER, &path), Some(1435));
    }

    #[test]
    fn reports_are_owed_only_when_more_arrived() {
        let path = PathState::default();
        assert_eq!(path.take_report(), None);
        path.probe_arrived(1200);
        path.probe_arrived(1100);
        assert_eq!(path.take_report(), Some(1200));
        assert_eq!(path.take_report(), None);
        path.probe_arrived(1300);
        assert_eq!(path.take_report(), Some(1300));
    }

    /// An IPv4 TCP SYN with `options`, its checksum right.
    fn syn(options: &[u8]) -> Vec<u8> {
        let tcp_len = 20 + options.len();
        let mut p = vec![0u8; 20 + tcp_len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 244, 1, 5]);
        p[16..20].copy_from_slice(&[10, 244, 1, 6]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[12] = ((tcp_len / 4) as u8) << 4;
        t[13] = 0x02;
        t[20..].copy_from_slice(options);
        let pseudo = checksum::pseudo_header(&p[12..20], 6, tcp_len as u32);
        let sum = checksum::add(pseudo, checksum::sum(&p[20..]));
        p[36..38].copy_from_slice(&(!sum).to_be_bytes());
        p
    }

    fn valid(p: &[u8]) -> bool {
        let pseudo = checksum::pseudo_header(&p[12..20], 6, (p.len() - 20) as u32);
        checksum::transport_valid(pseudo, &p[20..])
    }

    #[test]
    fn a_syns_mss_is_clamped_with_its_checksum_right_at_either_alignment() {
        // MSS first (aligned), and after a NOP (odd offset).
        for options in [vec![2, 4, 0x05, 0xb4, 1, 1, 1, 0], vec![1, 2, 4, 0x05, 0xb4, 1, 1, 0]] {
            let mut p = syn(&options);
            assert!(valid(&p));
            assert!(clamp_mss(&mut p, 1211));
            assert!(valid(&p), "checksum still right");
            let at = 40 + options.iter().position(|&b| b == 2).unwrap() + 2;
            assert_eq!(u16::from_be_bytes([p[at], p[at + 1]]), 1211 - 40);
            assert!(!clamp_mss(&mut p, 1211), "already small enough");
        }
        // Not a SYN, or no MSS: untouched.
        let mut ack = syn(&[2, 4, 0x05, 0xb4]);
        ack[33] = 0x10;
        let before = ack.clone();
        assert!(!clamp_mss(&mut ack, 1211));
        assert_eq!(ack, before);
        assert!(!clamp_mss(&mut syn(&[1, 1, 1, 0]), 1211));
        // Malformed options and short packets never panic.
        for cut in 0..before.len() {
            let mut p = syn(&[2, 4, 0x05, 0xb4])[..cut].to_vec();
            let _ = clamp_mss(&mut p, 1211);
        }
        assert!(!clamp_mss(&mut syn(&[2, 9, 0x05, 0xb4]), 1211));
    }
}
