#!/usr/bin/python3
"""Writes fuzz/corpus/nbd/*: NBD client byte streams (fixed newstyle handshake, options, then
transmission requests), and fuzz/corpus/qcow2/*: tiny qcow2 images made by qemu-img / qemu-io
(512-byte clusters; data, zeroes, a compressed cluster, an internal snapshot, a backing name).
Run from the repository root; the output is committed, so this runs only to refresh it."""
import os
import struct
import subprocess
import tempfile

OPT = 0x49484156454F5054
REQ = 0x25609513


def opt(num, data=b""):
    return struct.pack(">QII", OPT, num, len(data)) + data


def go(name=b"disk"):
    return opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))


def meta(ctx=b"base:allocation", name=b"disk"):
    return opt(10, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(ctx)) + ctx)


def req(typ, off=0, length=0, data=b"", flags=0, handle=1):
    return struct.pack(">IHHQQI", REQ, flags, typ, handle, off, length) + data


def nbd_seeds():
    flags = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
    io = (req(1, 4096, 512, b"\xab" * 512) + req(0, 0, 8192) + req(3) + req(6, 0, 4096) +
          req(4, 8192, 4096) + req(0, 4096, 512, flags=1))
    return {
        "simple.bin": flags + go() + io + req(2),
        "structured.bin": flags + opt(8) + meta() + go() + io + req(7, 0, 65536) + req(2),
        "list.bin": flags + opt(3) + opt(6, struct.pack(">I", 4) + b"disk" + b"\0\0") + opt(2),
        "oldname.bin": flags + opt(1, b"disk") + req(0, 0, 4096) + req(2),
    }


def qcow2_seeds(tmp):
    def img(name, *cmds, backing=None, snap=False):
        p = os.path.join(tmp, name)
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512"]
        if backing:
            open(os.path.join(tmp, backing), "wb").truncate(65536)
            args += ["-b", backing, "-F", "raw"]
        subprocess.run(args + [p, "64k"], check=True)
        for c in cmds:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", c, p], check=True,
                           stdout=subprocess.DEVNULL)
        if snap:
            subprocess.run(["qemu-img", "snapshot", "-c", "s1", p], check=True)
        return p
    return [img("empty.qcow2"),
            img("data.qcow2", "write -P 0x11 0 4k", "write -z 8k 2k", "write -c -P 0x22 16k 512"),
            img("snap.qcow2", "write -P 0x33 1k 1k", "write -P 0x44 0 512", snap=True),
            img("backing.qcow2", "write -P 0x55 32k 1k", backing="base.raw")]


def main():
    os.makedirs("fuzz/corpus/nbd", exist_ok=True)
    os.makedirs("fuzz/corpus/qcow2", exist_ok=True)
    for name, data in nbd_seeds().items():
        with open(os.path.join("fuzz/corpus/nbd", name), "wb") as f:
            f.write(data)
    with tempfile.TemporaryDirectory() as tmp:
        for p in qcow2_seeds(tmp):
            with open(p, "rb") as f, open(os.path.join("fuzz/corpus/qcow2",
                                                       os.path.basename(p)), "wb") as o:
                o.write(f.read())


if __name__ == "__main__":
    main()
