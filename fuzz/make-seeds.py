#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus (fuzz/seeds/TARGET/*): a few valid
inputs of each kind, so the fuzzer starts from the formats rather than from
nothing. Run from anywhere; the output is committed."""
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(proto, payload, ident=1, src=bytes([10, 244, 1, 5]), dst=bytes([10, 244, 2, 7])):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, src, dst)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h, h + payload


def tcp4(seq, payload, ident=1, flags=0x10):
    src, dst = bytes([10, 244, 1, 5]), bytes([10, 244, 2, 7])
    t = struct.pack("!HHIIBBHHH", 40000, 80, seq, 1, 5 << 4, flags, 65535, 0, 0) + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(t))
    t = t[:16] + struct.pack("!H", csum(pseudo + t)) + t[18:]
    return ipv4(6, t, ident)[1]


def udp4(payload, ident=1):
    src, dst = bytes([10, 244, 1, 5]), bytes([10, 244, 2, 7])
    u = struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(u))
    u = u[:6] + struct.pack("!H", csum(pseudo + u) or 0xFFFF) + u[8:]
    return ipv4(17, u, ident)[1]


def udp6(payload):
    src = bytes.fromhex("fd000000000000000000000000000005")
    dst = bytes.fromhex("fd000000000000000000000000000007")
    u = struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
    pseudo = src + dst + struct.pack("!IxxxB", len(u), 17)
    u = u[:6] + struct.pack("!H", csum(pseudo + u) or 0xFFFF) + u[8:]
    return struct.pack("!IHBB", 6 << 28, len(u), 17, 64) + src + dst + u


def main():
    shutil.rmtree(SEEDS, ignore_errors=True)
    # control_greeting: the cut byte, then a greeting or a refusal.
    write("control_greeting", "hello", b"\x05" + b"10.244.1.5\nfd00::5\0nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n\0")
    write("control_greeting", "refusal", b"\x00!another client is connected\0")
    # resolv_conf
    write("resolv_conf", "pod", "# generated\nnameserver 10.96.0.10\nnameserver fd00::a%eth0\nsearch default.svc.cluster.local. svc.cluster.local cluster.local\noptions ndots:5\n")
    write("resolv_conf", "domain", "domain home.arpa\nnameserver 192.168.1.1 ; router\n")
    # packet_inspect
    write("packet_inspect", "tcp4", tcp4(1000, b"hello"))
    write("packet_inspect", "udp4", udp4(b"query"))
    write("packet_inspect", "udp6", udp6(b"query"))
    # link_frames: the parameters message, and frames (virtio header + packet).
    write("link_frames", "params", b"TTLINK\x02\x03")
    # The authentication's challenge, answer and confirmation.
    write("link_frames", "auth-challenge", b"TTAUTH\x01" + bytes(range(32)))
    write("link_frames", "auth-answer", b"TTAUTH\x02" + bytes(range(64)))
    write("link_frames", "auth-confirm", b"TTAUTH\x03" + bytes(range(32, 64)))
    virtio_none = bytes(10)
    write("link_frames", "frame-plain", virtio_none + udp4(b"x" * 100))
    seg = b"y" * 1000
    big = tcp4(5000, seg * 3)
    # flags NEEDS_CSUM, GSO TCPv4, hdr_len 40, gso_size 1000, csum_start 20, csum_offset 16
    write("link_frames", "frame-tso", struct.pack("<BBHHHH", 1, 1, 40, 1000, 20, 16) + big)
    # dtls_records: mode 0 = a stranger's datagram; mode 1/3 = our record, maybe changed.
    hs = bytes([22, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12]) + bytes([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    write("dtls_records", "client-hello", b"\x00" + hs)
    app = bytes([23, 0xFE, 0xFD, 0, 1, 0, 0, 0, 0x10, 0, 0, 0, 40]) + bytes(40)
    write("dtls_records", "forged-app-data", b"\x00" + app + hs)
    write("dtls_records", "ours", b"\x01\x07" + udp4(b"payload"))
    write("dtls_records", "ours-changed", b"\x03\x07" + udp4(b"payload"))
    # dtls_hello: ClientHellos as a client sends them, first without a cookie, then with.
    def client_hello(record_seq, message_seq, cookie, extensions=b"\x00\x17\x00\x00"):
        body = b"\xfe\xfd" + bytes(range(32)) + b"\x00" + bytes([len(cookie)]) + cookie
        body += b"\x00\x04\xc0\x2b\xc0\x2f\x01\x00" + struct.pack("!H", len(extensions)) + extensions
        h = b"\x01" + struct.pack("!I", len(body))[1:] + struct.pack("!H", message_seq) + b"\x00\x00\x00" + struct.pack("!I", len(body))[1:] + body
        return bytes([22, 0xFE, 0xFD, 0, 0]) + struct.pack("!Q", record_seq)[2:] + struct.pack("!H", len(h)) + h
    write("dtls_hello", "first", client_hello(0, 0, b""))
    write("dtls_hello", "with-cookie", client_hello(1, 1, bytes(range(20))))
    write("dtls_hello", "retransmitted", client_hello(7, 1, b"\x55" * 32))
    # Our client's: the proof (type 0xff74, 16 bytes) as the last extension.
    write("dtls_hello", "with-proof", client_hello(1, 1, bytes(range(20)), b"\x00\x17\x00\x00\xff\x74\x00\x10" + bytes(range(16))))
    # gro_coalesce: capabilities, then length-prefixed packets.
    flow = b"".join(struct.pack("!H", len(p)) + p for p in (tcp4(1000 + 500 * i, b"z" * 500, ident=1 + i) for i in range(4)))
    write("gro_coalesce", "tcp-burst", b"\x03" + flow)
    dgrams = b"".join(struct.pack("!H", len(p)) + p for p in (udp4(b"d" * 300, ident=i) for i in range(3)))
    write("gro_coalesce", "udp-burst", b"\x03" + dgrams + struct.pack("!H", 5) + b"junk!")
    # scenario_file: the shipped scenarios.
    scen = os.path.join(HERE, "..", "scenarios")
    for name in sorted(os.listdir(scen)):
        with open(os.path.join(scen, name), "rb") as f:
            write("scenario_file", name, f.read())


main()
