#!/usr/bin/env python3
"""Writes well-formed seed inputs into seeds/<target>/ (committed; deploy/fuzz.sh copies them
into a scratch corpus) so fuzzing starts from requests, frames and packets the code accepts
(the fuzzer then mutates them). Layouts follow src/lib.rs: fuzzed_queue() and the targets' own
input readers. The vm_state and manifest_reader seeds are real files written by the Rust types
themselves: `DORMOUSE_WRITE_FUZZ_SEEDS=1 cargo test -p tests --test fuzz_seeds`."""
import os
import struct

DATA = 0x8000
NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def queue(descs, heads, size_exp, flags=1):
    size = 1 << size_exp
    table = b"".join(descs) + b"\0" * 16 * (size - len(descs))
    ring = [*heads] + [0] * (size + 1 - len(heads))
    avail = struct.pack("<HH", 0, len(heads)) + struct.pack("<%dH" % len(ring), *ring)
    return bytes([size_exp, flags]) + table + avail


def blk_seed(req_type, sector, data_len, data_writable, payload=b""):
    descs = [desc(DATA, 16, NEXT, 1)]
    if data_len:
        descs.append(desc(DATA + 0x100, data_len, NEXT | (WRITE if data_writable else 0), 2))
    descs.append(desc(DATA + 0x4000, 1, WRITE, 0))
    descs[-2] = descs[-2][:14] + struct.pack("<H", len(descs) - 1)
    head = struct.pack("<HBB", 0x200, 0, 0)  # 4 KiB disk, writable
    data = struct.pack("<IIQ", req_type, 0, sector) + b"\0" * (0x100 - 16) + payload
    return head + queue(descs, [0], 2) + data


def net_seed():
    rx = queue([desc(DATA + 0x1000, 2048, WRITE, 0)], [0], 1)
    tx = queue([desc(DATA, 12, NEXT, 1), desc(DATA + 0x100, 60, 0, 0)], [0], 1)
    frames = bytes([2]) + bytes([3]) + struct.pack("<H", 72) + b"\0" * 12 + b"\xab" * 60
    frames += bytes([0])  # a read error
    return rx + tx + frames + bytes([0]) + b"\0" * 0x100 + b"\xcd" * 60


def mmio_seed():
    # Init shortcut (op 7) with a 16-entry queue at 0x1000, then a notify and an event-loop pass.
    out = bytes([0])  # writable disk
    out += bytes([7, 0, 0, 0]) + struct.pack("<Q", 0) + struct.pack("<HH", 16, 0x1000)
    out += bytes([0, 0x50, 0, 4]) + struct.pack("<Q", 0)  # QueueNotify = 0
    out += bytes([6, 0, 0, 0])
    out += bytes([0x47, 0, 0, 0])  # snapshot round trip
    return out


def http_seed(chunks, request):
    # api_http: first byte = how many chunk sizes follow (mod 8), then the request bytes.
    return bytes([len(chunks)]) + bytes(chunks) + request


def vsock_hdr(src_cid, dst_cid, src_port, dst_port, length, op, flags=0, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, 1, op, flags,
                       buf_alloc, fwd_cnt)


def mux_packet(op, src_port, dst_port, data=b"", local=False):
    # vsock_muxer op 0: mode (1 = fold CIDs/ports, 2 = host port from LOCAL_PORT_BASE, 4 = length
    # from the header), 44 header bytes, the payload.
    mode = 1 | 4 | (2 if local else 0)
    return bytes([0, mode]) + vsock_hdr(3, 2, src_port, dst_port, len(data), op) + data


def muxer_seed():
    out = mux_packet(1, 1, 2)                       # guest connects to host port 2 (accepted)
    out += bytes([8, 3])                            # take RX packets (RESPONSE)
    out += mux_packet(5, 1, 2, b"hello host")       # data to the host
    out += bytes([5, 0])                            # host reads it
    out += bytes([4, 0]) + struct.pack("<H", 100)   # host writes 100 bytes
    out += bytes([7]) + struct.pack("<H", 1)        # host events
    out += bytes([8, 3])                            # RW for the guest
    out += bytes([6]) + struct.pack("<I", 5) + bytes([1])  # host connects to guest port 5
    out += bytes([7]) + struct.pack("<H", 0) + bytes([8, 3])  # REQUEST for the guest
    out += mux_packet(2, 5, 0, local=True)          # guest accepts (host port LOCAL_PORT_BASE)
    out += mux_packet(6, 1, 2)                      # credit update
    out += mux_packet(4, 1, 2)                      # shutdown
    out += bytes([7]) + struct.pack("<H", 600) + bytes([8, 3])  # timeouts pass
    out += bytes([9, 0])                            # reset everything
    return out


def vsock_device_seed():
    rx = queue([desc(0xc000, 4096, WRITE, 0)], [0, 0], 1)
    tx = queue([desc(0xa000, 44 + 5, 0, 0)], [0, 0], 1)
    ev = queue([desc(0xe000, 8, WRITE, 0)], [0], 1)
    payload = vsock_hdr(3, 2, 1000, 1, 0, 1)       # REQUEST to host port 1 (a listener)
    out = rx + tx + ev + struct.pack("<H", len(payload)) + payload
    out += bytes([0, 3, 5])                         # TX kick, RX kick, host events
    rw = vsock_hdr(3, 2, 1000, 1, 5, 5) + b"hello"
    out += bytes([6]) + struct.pack("<Q", 0xa000) + bytes([len(rw)]) + rw
    out += bytes([7, 1, 1, 0])                      # second TX chain available, TX kick
    out += bytes([8]) + struct.pack("<I", 2)        # host connects to guest port 2
    out += bytes([5, 7, 0, 1, 3])                   # host events, more RX buffers, RX kick
    out += bytes([11, 4])                           # transport reset, event kick
    return out


def write(target, name, data):
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


write("virtio_blk_request", "in", blk_seed(0, 1, 512, True))
write("virtio_blk_request", "out", blk_seed(1, 2, 1024, False, b"\x11" * 1024))
write("virtio_blk_request", "flush", blk_seed(4, 0, 0, False))
write("virtio_blk_request", "get-id", blk_seed(8, 0, 20, True))
write("virtio_blk_request", "discard", blk_seed(11, 0, 16, False, struct.pack("<QII", 1, 2, 0)))
write("virtio_blk_request", "write-zeroes", blk_seed(13, 0, 16, False, struct.pack("<QII", 1, 2, 1)))
write("virtio_net_rxtx", "rx-tx", net_seed())
write("mmio_transport", "init-notify-snapshot", mmio_seed())
# virtio_balloon: an inflate array of PFNs 8..10, a free page report and a statistics buffer.
balloon_q = queue([desc(DATA, 12, 0, 0), desc(0x1_0000, 0x8000, WRITE, 0), desc(DATA + 0x100, 20, 0, 0)],
                  [0, 1, 2], 2)
balloon_data = struct.pack("<III", 8, 9, 10) + b"\0" * (0x100 - 12) + struct.pack("<HQHQ", 4, 1 << 20, 5, 1 << 21)
write("virtio_balloon", "inflate-report-stats", balloon_q + bytes([0, 1, 2, 0, 0, 0, 0, 0]) + balloon_data)

write("api_http", "get-info", http_seed([], b"GET /v1/vm HTTP/1.1\r\nHost: localhost\r\n\r\n"))
write("api_http", "pause-chunked", http_seed([1, 7, 3], b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))
body = b'{"dir": "/tmp/snap", "diff": false}'
write("api_http", "snapshot", http_seed([16], b"PUT /v1/vm/snapshot?x=1 HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
body = b'{"timeout_ms": 100}'
write("api_http", "agent-wait", http_seed([2], b"PUT /v1/agent/wait HTTP/1.1\nExpect: 100-continue\nContent-Length: %d\n\n%s" % (len(body), body)))
body = b'{"port": 1024}'
write("api_http", "vsock-connect", http_seed([], b"GET /v1/vsock/connect HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
write("api_http", "shutdown", http_seed([5, 5], b"PUT /v1/vm/shutdown HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
write("vsock_muxer", "connect-data-shutdown", muxer_seed())
write("vsock_device", "request-rw-reset", vsock_device_seed())
# state_reader (stand-in type): an odd first byte seals the rest in a valid header.
write("state_reader", "sealed-empty-state", bytes([1, 0, 0, 0, 0, 0, 0]) + b"\0" * 8 + b"\0" * 8)
write("state_reader", "raw", b"DMSTATE\0" + b"\0" * 40)

# mmds_frames: an ARP request for 169.254.169.254, then a SYN to its port 80 (checksums are not
# checked), each taken by the guest at once.
guest_mac, mmds_mac = bytes([2, 0, 0, 0, 0, 1]), bytes([6, 1, 0x23, 0x45, 0x67, 1])
guest_ip, mmds_ip = bytes([169, 254, 0, 2]), bytes([169, 254, 169, 254])
arp = b"\xff" * 6 + guest_mac + b"\x08\x06" + bytes([0, 1, 8, 0, 6, 4, 0, 1]) + guest_mac + guest_ip + b"\0" * 6 + mmds_ip
tcp = struct.pack(">HHIIBBHHH", 40000, 80, 1000, 0, 5 << 4, 0x02, 64000, 0, 0)
ip = struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0) + guest_ip + mmds_ip
syn = mmds_mac + guest_mac + b"\x08\x00" + ip + tcp
write("mmds_frames", "arp-syn", b"".join(struct.pack("<H", len(f)) + f + b"\x01" for f in (arp, syn)))
