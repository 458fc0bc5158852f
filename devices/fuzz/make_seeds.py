#!/usr/bin/env python3
"""Writes well-formed seed inputs into corpus/<target>/ so fuzzing starts from requests and
frames the devices accept (the fuzzer then mutates them). Layouts follow src/lib.rs:
fuzzed_queue() and the targets' own headers."""
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


def write(target, name, data):
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", target)
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
