#!/usr/bin/env python3
"""Writes an uncompressed newc cpio archive from a gen_init_cpio-style list, without root.

List lines (as the kernel's usr/gen_init_cpio takes them):
  dir   NAME MODE UID GID
  file  NAME SOURCE MODE UID GID
  slink NAME TARGET MODE UID GID
  nod   NAME MODE UID GID c|b MAJOR MINOR
Usage: mkcpio.py LIST OUT
"""
import os
import stat
import sys


def header(ino, mode, uid, gid, nlink, mtime, size, rmaj, rmin, name):
    fields = [ino, mode, uid, gid, nlink, mtime, size, 0, 0, rmaj, rmin, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08x" % f for f in fields)


def pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    lst, out = sys.argv[1], sys.argv[2]
    chunks = []
    ino = 721
    for lineno, raw in enumerate(open(lst), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        f = line.split()
        kind, name = f[0], f[1].lstrip("/")
        data = b""
        rmaj = rmin = 0
        try:
            if kind == "dir":
                mode, uid, gid = int(f[2], 8) | stat.S_IFDIR, int(f[3]), int(f[4])
            elif kind == "file":
                with open(f[2], "rb") as src:
                    data = src.read()
                mode, uid, gid = int(f[3], 8) | stat.S_IFREG, int(f[4]), int(f[5])
            elif kind == "slink":
                data = f[2].encode()
                mode, uid, gid = int(f[3], 8) | stat.S_IFLNK, int(f[4]), int(f[5])
            elif kind == "nod":
                dev = stat.S_IFCHR if f[5] == "c" else stat.S_IFBLK
                mode, uid, gid = int(f[2], 8) | dev, int(f[3]), int(f[4])
                rmaj, rmin = int(f[6]), int(f[7])
            else:
                raise ValueError(f"unknown entry kind {kind!r}")
        except (IndexError, ValueError, OSError) as e:
            sys.exit(f"{lst}:{lineno}: {e}")
        bname = name.encode()
        h = header(ino, mode, uid, gid, 2 if kind == "dir" else 1, 0, len(data), rmaj, rmin, bname)
        rec = h + bname + b"\0"
        chunks.append(rec + pad(len(rec)) + data + pad(len(data)))
        ino += 1
    trailer = header(0, 0, 0, 0, 1, 0, 0, 0, 0, b"TRAILER!!!") + b"TRAILER!!!\0"
    chunks.append(trailer + pad(len(trailer)))
    tmp = out + ".tmp"
    with open(tmp, "wb") as o:
        o.write(b"".join(chunks))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
