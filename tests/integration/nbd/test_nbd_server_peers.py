"""vdiskd served to real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy, fio.

Raw and qcow2 images. The oracle is the image file
itself, read back by qemu-img / qemu-io after the daemon exits.
"""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import assert_qemu_check_clean, qemu_img, qemu_io, run
import nbd_helpers as H

SIZE = 16 * 1024 * 1024


def make_image(tmp, fmt, size=SIZE, name="disk"):
    img = os.path.join(str(tmp), f"{name}.{fmt}")
    qemu_img("create", "-f", fmt, img, size)
    return img


@pytest.fixture(params=["raw", "qcow2"])
def fmt(request):
    return request.param


def test_qemu_io_patterns_and_compare(tmp, fmt):
    img = make_image(tmp, fmt)
    d = H.start_daemon(tmp, img, fmt)
    try:
        u = d.uri()
        qemu_io("-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 3M 100k",
                "-c", "write -P 0x11 8191k 2k", "-c", "write -z 5M 1M", "-c", "discard 0 64k",
                "-c", "flush", u)
        p = qemu_io("-f", "raw", "-c", "read -P 0xcd 3M 100k", "-c", "read -P 0x11 8191k 2k",
                    "-c", "read -P 0xab 64k 960k", "-c", "read -P 0 5M 1M", u)
        assert "Pattern verification failed" not in p.stdout + p.stderr
        # while served: the export and the file agree
        qemu_img("compare", "-U", "-f", fmt, "-F", "raw", img, u)
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
    # after a clean shutdown, the image holds the data (read back by QEMU itself)
    p = qemu_io("-f", fmt, "-c", "read -P 0xcd 3M 100k", "-c", "read -P 0x11 8191k 2k",
                "-c", "read -P 0xab 64k 960k", img)
    assert "Pattern verification failed" not in p.stdout + p.stderr
    if fmt == "qcow2":
        assert_qemu_check_clean(img)


def test_nbdinfo_and_map(tmp, fmt):
    img = make_image(tmp, fmt)
    qemu_io("-f", fmt, "-c", "write -P 1 0 192k", "-c", "write -P 2 2M 64k",
            "-c", "write -z 4M 128k", img)
    d = H.start_daemon(tmp, img, fmt, writable=False, description="a disk")
    try:
        info = json.loads(run(["nbdinfo", "--json", d.uri()]).stdout)
        e = info["exports"][0]
        assert e["export-size"] == SIZE
        assert e["is_read_only"] is True
        assert e["can_multi_conn"] is True and e["can_flush"] is True
        assert e["block_size_maximum"] == 32 * 1024 * 1024
        assert e.get("description") == "a disk"
        assert "base:allocation" in e["contexts"]
        nbd_map = json.loads(run(["nbdinfo", "--map", "--json", d.uri()]).stdout)
        qmap = json.loads(qemu_img("map", "--output=json", "-U", "-f", fmt, img).stdout)
        # flatten both to per-4k (data, zero) and compare: extents may be split differently
        def per_block(extents):
            out = {}
            for start, length, data, zero in extents:
                for b in range(start // 4096, (start + length) // 4096):
                    out[b] = (data, zero)
            return out
        ours = per_block([(m["offset"], m["length"], not (m["type"] & 1), bool(m["type"] & 2))
                          for m in nbd_map])
        theirs = per_block([(m["start"], m["length"], m["data"], m["zero"]) for m in qmap])
        assert ours == theirs
        assert d.stop() == 0
    finally:
        d.kill()


def test_nbdcopy_both_ways(tmp, fmt):
    src = os.path.join(str(tmp), "src.raw")
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for i in range(0, SIZE, 1024 * 1024 + 4096):
            f.seek(i)
            f.write(os.urandom(70000))
    img = make_image(tmp, fmt)
    d = H.start_daemon(tmp, img, fmt)
    try:
        run(["nbdcopy", src, d.uri()], timeout=60)
        out = os.path.join(str(tmp), "out.raw")
        run(["nbdcopy", d.uri(), out], timeout=60)
        qemu_img("compare", "-f", "raw", "-F", "raw", src, out)
        assert d.stop() == 0
    finally:
        d.kill()
    qemu_img("compare", "-f", "raw", "-F", fmt, src, img)


def test_fio_two_connections_verify(tmp, fmt):
    img = make_image(tmp, fmt)
    d = H.start_daemon(tmp, img, fmt)
    try:
        job = os.path.join(str(tmp), "nbd.fio")
        # two jobs = two NBD connections, each writing and verifying its own half
        with open(job, "w") as f:
            f.write(f"""[global]
ioengine=nbd
uri={d.uri()}
rw=randwrite
bs=4k
size=4M
iodepth=8
verify=crc32c
do_verify=1
verify_fatal=1
verify_state_save=0

[a]
offset=0

[b]
offset=8M
""")
        p = run(["fio", "--output-format=terse", job], check=False, timeout=90)
        assert p.returncode == 0, p.stdout + p.stderr
        assert d.stop() == 0
    finally:
        d.kill()


def test_sigint_and_concurrent_clients(tmp):
    img = make_image(tmp, "raw")
    d = H.start_daemon(tmp, img, "raw")
    try:
        procs = [subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i}M 1M",
                                   "-c", f"read -P {i + 1} {i}M 1M", d.uri()],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(6)]
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0 and "verification failed" not in out, out
        assert d.stop(signal.SIGINT) == 0
    finally:
        d.kill()
    for i in range(6):
        qemu_io("-f", "raw", "-c", f"read -P {i + 1} {i}M 1M", img)


def test_kill9_under_write_load(tmp, fmt):
    img = make_image(tmp, fmt, size=64 * 1024 * 1024)
    d = H.start_daemon(tmp, img, fmt)
    try:
        # data made durable before the load starts (FUA via qemu-io -f raw writes + flush)
        qemu_io("-f", "raw", "-c", "write -P 0x77 0 2M", "-c", "flush", d.uri())
        load = subprocess.Popen(
            ["qemu-io", "-f", "raw", *sum((["-c", f"aio_write -P 9 {8 + (i % 48)}M 512k"]
                                           for i in range(200)), []), "-c", "aio_flush", d.uri()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        d.proc.kill()
        d.proc.wait()
        load.kill()
        load.wait()
    finally:
        d.kill()
    if fmt == "qcow2":
        p = qemu_img("check", "-f", "qcow2", img, check=False)
        # leaks are allowed after a crash (exit 3); corruption (2) or errors (1) are not
        assert p.returncode in (0, 3), p.stdout + p.stderr
    p = qemu_io("-f", fmt, "-c", "read -P 0x77 0 2M", img)
    assert "verification failed" not in p.stdout + p.stderr


def test_qcow2_backing_chain_read_and_map(tmp):
    base = make_image(tmp, "qcow2", name="base")
    qemu_io("-f", "qcow2", "-c", "write -P 0x0b 0 1M", "-c", "write -P 0x0c 4M 512k", base)
    top = os.path.join(str(tmp), "top.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", "write -P 0x7a 512k 64k", "-c", "write -z 4M 64k", top)
    d = H.start_daemon(tmp, top, "qcow2", writable=False)
    try:
        u = d.uri()
        qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", top, u)
        p = qemu_io("-r", "-f", "raw", "-c", "read -P 0x0b 0 512k", "-c", "read -P 0x7a 512k 64k",
                    "-c", "read -P 0 4M 64k", "-c", "read -P 0x0c 4160k 448k", u)
        assert "verification failed" not in p.stdout + p.stderr
        nbd_map = json.loads(run(["nbdinfo", "--map", "--json", u]).stdout)
        qmap = json.loads(qemu_img("map", "--output=json", "-U", "-f", "qcow2", top).stdout)

        def per_block(extents):
            out = {}
            for start, length, data, zero in extents:
                for b in range(start // 65536, (start + length) // 65536):
                    out[b] = (data, zero)
            return out
        ours = per_block([(m["offset"], m["length"], not (m["type"] & 1), bool(m["type"] & 2))
                          for m in nbd_map])
        theirs = per_block([(m["start"], m["length"], m["data"], m["zero"]) for m in qmap])
        assert ours == theirs
        assert d.stop() == 0
    finally:
        d.kill()


def test_qcow2_concurrent_allocating_writes(tmp):
    """Three clients allocate the same clusters at once (sub-cluster, overlapping): the image stays
    consistent and every 4k block holds one whole write."""
    img = make_image(tmp, "qcow2")
    d = H.start_daemon(tmp, img, "qcow2")
    try:
        procs = []
        for k in range(3):
            cmds = []
            for i in range(128):
                cmds += ["-c", f"aio_write -P {k + 1} {((i * 37) % 128) * 4}k 4k"]
            procs.append(subprocess.Popen(["qemu-io", "-f", "raw", *cmds, "-c", "aio_flush",
                                           d.uri()], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0 and "error" not in out.lower(), out
        out = os.path.join(str(tmp), "out.raw")
        run(["nbdcopy", d.uri(), out], timeout=60)
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
    assert_qemu_check_clean(img)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", img, out)
    with open(out, "rb") as f:
        data = f.read(1 << 20)
    for b in range(0, 512 * 1024, 4096):
        blk = data[b:b + 4096]
        assert blk in (bytes([1]) * 4096, bytes([2]) * 4096, bytes([3]) * 4096), b
