use super::*;
use proptest::prelude::*;

/// A TCP or UDP flow's packets as a sender's kernel makes them: consecutive
/// sequence numbers and IPv4 ids, valid checksums, PSH on the last.
#[derive(Clone, Debug)]
struct Flow {
    v6: bool,
    udp: bool,
    port: u16,
    options: usize,
    seq: u32,
    id: u16,
}

fn packet(f: &Flow, seq: u32, id: u16, payload: &[u8], psh: bool) -> Vec<u8> {
    let ip = if f.v6 { 40 } else { 20 };
    let transport = if f.udp { 8 } else { 20 + f.options };
    let total = ip + transport + payload.len();
    let mut p = vec![0u8; total];
    if f.v6 {
        p[0] = 0x60;
        p[1] = 0x0a; // a flow label
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        p[6] = if f.udp { UDP } else { TCP };
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = if f.udp { UDP } else { TCP };
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let sum = !checksum::sum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let t = ip;
    p[t..t + 2].copy_from_slice(&f.port.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
    if f.udp {
        p[t + 4..t + 6].copy_from_slice(&((total - ip) as u16).to_be_bytes());
    } else {
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
        p[t + 12] = ((transport / 4) as u8) << 4;
        p[t + 13] = TCP_ACK | if psh { TCP_PSH } else { 0 };
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        for (k, b) in p[t + 20..t + transport].iter_mut().enumerate() {
            *b = [1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3][k % 12]; // NOP NOP timestamps
        }
    }
    p[ip + transport..].copy_from_slice(payload);
    let layout = Layout::of(&p).unwrap();
    let pseudo = checksum::pseudo_header(&p[layout.addresses()], layout.protocol, (total - ip) as u32);
    let at = t + if f.udp { 6 } else { 16 };
    let mut sum = !checksum::add(pseudo, checksum::sum(&p[t..]));
    if f.udp && sum == 0 {
        sum = 0xffff;
    }
    p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    assert!(layout.checksum_valid(&p));
    p
}

/// `count` segments of `mss` bytes (the last `last` bytes) of a flow.
fn segments(f: &Flow, mss: usize, count: usize, last: usize, fill: u8) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let len = if i + 1 == count { last } else { mss };
            let payload: Vec<u8> = (0..len).map(|k| fill.wrapping_add((k * 7 + i) as u8)).collect();
            let seq = f.seq.wrapping_add((i * mss) as u32);
            packet(f, seq, f.id.wrapping_add(i as u16), &payload, i + 1 == count)
        })
        .collect()
}

fn coalesce(packets: &[Vec<u8>], caps: Capabilities) -> (Vec<Vec<u8>>, Coalescer) {
    let mut c = Coalescer::new(caps);
    let mut out = PacketBatch::new();
    let mut frames = Vec::new();
    for p in packets {
        while !c.push(p, &mut out) {
            c.finish(&mut out);
            frames.extend(out.iter().map(<[u8]>::to_vec));
            out.clear();
        }
    }
    c.finish(&mut out);
    frames.extend(out.iter().map(<[u8]>::to_vec));
    (frames, c)
}

fn split(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    for f in frames {
        let mut out = PacketBatch::new();
        let mut f = f.clone();
        split_frame(&mut f, &mut out, 21).unwrap();
        assert!((0..out.len()).all(|i| out.start(i) == 21));
        got.extend(out.iter().map(<[u8]>::to_vec));
    }
    got
}

const ALL: Capabilities = Capabilities { tcp: true, udp: true };

#[test]
fn a_tcp_burst_becomes_one_frame_and_splits_back_exactly() {
    for v6 in [false, true] {
        let f = Flow {
            v6,
            udp: false,
            port: 40000,
            options: 12,
            seq: u32::MAX - 3000, // wraps inside the burst
            id: u16::MAX - 5,
        };
        let sent = segments(&f, 1388, 40, 700, 3);
        let (frames, c) = coalesce(&sent, ALL);
        assert_eq!(frames.len(), 1, "one super-packet");
        assert_eq!(c.stats.merged, 39);
        let h = VirtioHeader::decode(&frames[0]).unwrap();
        assert_eq!(
            (h.flags, h.gso_type, h.gso_size, h.csum_start, h.csum_offset),
            (
                F_NEEDS_CSUM,
                if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                1388,
                if v6 { 40 } else { 20 },
                16
            )
        );
        assert_eq!(split(&frames), sent);
    }
}

#[test]
fn udp_datagrams_merge_only_where_the_destination_takes_them() {
    let f = Flow {
        v6: false,
        udp: true,
        port: 5353,
        options: 0,
        seq: 0,
        id: 100,
    };
    let sent = segments(&f, 1200, 10, 1200, 9);
    let (frames, _) = coalesce(&sent, ALL);
    assert_eq!(frames.len(), 1);
    assert_eq!(VirtioHeader::decode(&frames[0]).unwrap().gso_type, GSO_UDP_L4);
    assert_eq!(split(&frames), sent);
    let (frames, _) = coalesce(&sent, Capabilities { tcp: true, udp: false });
    assert_eq!(frames.len(), 10);
    assert!(frames
        .iter()
        .all(|fr| fr[..VIRTIO_HEADER_LEN] == [0; VIRTIO_HEADER_LEN]));
}

#[test]
fn anything_else_passes_alone_and_in_order() {
    let f = Flow {
        v6: false,
        udp: false,
        port: 1,
        options: 0,
        seq: 1000,
        id: 1,
    };
    let burst = segments(&f, 1000, 6, 1000, 1);
    let mut icmp = packet(&f, 0, 0, b"ping", false);
    icmp[9] = 1;
    let mut syn = packet(&f, 0, 0, b"", false);
    syn[20 + 13] = 0x02;
    // A pure ACK of the same flow between data: later data must not overtake it.
    let ack = packet(&f, 1000 + 3000, 4, b"", false);
    let sent = vec![
        burst[0].clone(),
        burst[1].clone(),
        burst[2].clone(),
        ack.clone(),
        icmp.clone(),
        syn.clone(),
        burst[3].clone(),
        burst[4].clone(),
        burst[5].clone(),
    ];
    let (frames, _) = coalesce(&sent, ALL);
    assert_eq!(frames.len(), 5, "data, ack, icmp, syn, data");
    assert_eq!(split(&frames), sent);
}

#[test]
fn a_segment_with_a_bad_checksum_is_not_merged() {
    let f = Flow {
        v6: true,
        udp: false,
        port: 9,
        options: 0,
        seq: 1,
        id: 0,
    };
    let mut sent = segments(&f, 500, 5, 500, 0);
    let last = sent[2].len() - 1;
    sent[2][last] ^= 0x40;
    let (frames, c) = coalesce(&sent, ALL);
    assert_eq!(c.stats.bad_checksums, 1);
    assert_eq!(frames.len(), 3, "[0,1], the damaged one alone, [3,4]");
    assert_eq!(
        split(&frames),
        sent,
        "the damaged one is passed on unchanged, for the kernel to drop"
    );
}

#[test]
fn interleaved_flows_each_get_their_frame() {
    let flows: Vec<Flow> = (0..3)
        .map(|k| Flow {
            v6: k == 1,
            udp: false,
            port: 1000 + k,
            options: 0,
            seq: 5000 * u32::from(k),
            id: 7,
        })
        .collect();
    let per: Vec<Vec<Vec<u8>>> = flows.iter().map(|f| segments(f, 900, 8, 900, 2)).collect();
    let mut sent = Vec::new();
    for i in 0..8 {
        for p in &per {
            sent.push(p[i].clone());
        }
    }
    let (frames, _) = coalesce(&sent, ALL);
    assert_eq!(frames.len(), 3);
    let got = split(&frames);
    let want: Vec<Vec<u8>> = per.concat();
    assert_eq!(got, want, "each flow in order, flows one after the other");
}

#[test]
fn frames_stop_at_64_segments_and_65535_bytes() {
    let f = Flow {
        v6: false,
        udp: false,
        port: 2,
        options: 0,
        seq: 0,
        id: 0,
    };
    let sent = segments(&f, 100, 150, 100, 0);
    let (frames, _) = coalesce(&sent, ALL);
    assert_eq!(frames.len(), 3, "64 + 64 + 22");
    assert_eq!(split(&frames), sent);
    let sent = segments(&f, 1400, 60, 1400, 0);
    let (frames, _) = coalesce(&sent, ALL);
    assert!(frames.iter().all(|fr| fr.len() - VIRTIO_HEADER_LEN <= 65535));
    assert_eq!(split(&frames), sent);
}

proptest! {
    /// Coalescing then splitting gives back exactly the packets sent, for
    /// any mix of flows, sizes and options, and every frame is valid.
    #[test]
    fn coalesce_then_split_is_the_identity(
        flows in proptest::collection::vec((any::<bool>(), any::<bool>(), 0usize..4, any::<u32>(), any::<u16>(), 1usize..1461, 1usize..40), 1..4),
        interleave in any::<bool>(),
    ) {
        let mut per = Vec::new();
        for (k, &(v6, udp, options, seq, id, mss, count)) in flows.iter().enumerate() {
            let f = Flow { v6, udp, port: 100 + k as u16, options: options * 4, seq, id };
            let last = 1 + (seq as usize % mss);
            per.push(segments(&f, mss, count, last, k as u8));
        }
        let sent: Vec<Vec<u8>> = if interleave {
            let longest = per.iter().map(Vec::len).max().unwrap_or(0);
            (0..longest).flat_map(|i| per.iter().filter_map(move |p| p.get(i).cloned())).collect()
        } else {
            per.concat()
        };
        let (frames, _) = coalesce(&sent, ALL);
        let mut got = split(&frames);
        let mut want = sent.clone();
        // Flows may come out in another order; within a flow, never.
        let flow = |p: &Vec<u8>| {
            let ip = if p[0] >> 4 == 6 { 40 } else { 20 };
            (p[0] >> 4, u16::from_be_bytes([p[ip], p[ip + 1]]))
        };
        got.sort_by_key(flow);
        want.sort_by_key(flow);
        prop_assert_eq!(got, want);
    }

    /// Arbitrary packets never panic the coalescer, and arbitrary frames
    /// never panic the splitter.
    #[test]
    fn garbage_never_panics(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
        let _ = coalesce(&packets, ALL);
        for p in &packets {
            let mut out = PacketBatch::with_capacity(64, 2048);
            let mut frame = p.clone();
            let _ = split_frame(&mut frame, &mut out, 21);
        }
    }
}

/// Found by the gro_coalesce fuzz target: an empty packet made a frame with
/// no packet in it, which the splitter (and the kernel) refuse.
#[test]
fn an_empty_packet_is_dropped_and_counted() {
    let (frames, c) = coalesce(&[vec![], vec![0x45]], ALL);
    assert_eq!(c.stats.dropped, 1);
    assert_eq!(split(&frames), vec![vec![0x45]]);
}

/// Three 500-byte segments of one TCP flow, valid as the kernel makes them.
fn burst(v6: bool) -> Vec<Vec<u8>> {
    let f = Flow {
        v6,
        udp: false,
        port: 100,
        options: 0,
        seq: 1,
        id: 1,
    };
    segments(&f, 500, 3, 500, 7)
}

/// `packets` coalesced into one frame whose virtio header `change` edits,
/// then split.
fn split_edited(packets: &[Vec<u8>], change: impl FnOnce(&mut VirtioHeader)) -> Vec<Vec<u8>> {
    let (mut frames, _) = coalesce(packets, ALL);
    assert_eq!(frames.len(), 1);
    let mut header = VirtioHeader::decode(&frames[0]).unwrap();
    change(&mut header);
    header.encode(&mut frames[0]);
    split(&frames)
}

/// Found by the gro_coalesce fuzz target: a segment whose IPv4 header
/// checksum was wrong merged (only the TCP checksum was checked), and came
/// out of the split with a fresh, right one. It must pass alone, as sent.
#[test]
fn a_segment_with_a_bad_ipv4_header_checksum_is_not_merged() {
    let mut sent = burst(false);
    sent[2][10] ^= 0x08;
    let (frames, c) = coalesce(&sent, ALL);
    assert_eq!(c.stats.merged, 1);
    assert_eq!(split(&frames), sent);
}

/// Found in review: the kernel's `hdr_len` is the packet's linear part,
/// which may hold payload (a forwarded, GRO-built packet); cut by it, every
/// segment would carry a copy of that payload. Splitting reads the headers'
/// length from the packet instead.
#[test]
fn a_header_length_past_the_headers_does_not_copy_payload() {
    let sent = burst(false);
    assert_eq!(split_edited(&sent, |h| h.hdr_len += 100), sent);
}

/// The ECN bit the kernel may add to the GSO type does not stop a split.
#[test]
fn the_ecn_bit_of_the_gso_type_is_ignored() {
    let sent = burst(true);
    assert_eq!(split_edited(&sent, |h| h.gso_type |= 0x80), sent);
}
