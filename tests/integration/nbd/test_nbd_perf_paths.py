"""The NBD server's fast paths under pipelining, end to end through vdiskd.

Many requests sent in one burst land in one receive buffer and are handed to the workers in
batches; small write payloads are taken from that buffer, large ones read past it; replies are
sent by whichever worker owns the socket, out of order; O_DIRECT nodes take the pool's blocking
path (a worker per request). Two connections write disjoint halves of a qcow2 image (partly
allocated, so both allocating writes and in-place overwrites happen), with FUA writes and flushes
mixed in, then read everything back pipelined; the image must hold exactly what was acknowledged
and pass qemu-img check.
"""
import json
import random
import threading

import pytest

from conftest import assert_qemu_check_clean, qemu_img, qemu_io
from nbd_helpers import CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_FUA, RawClient, start_daemon

MiB = 1 << 20
SIZE = 16 * MiB
SIZES = [512, 4096, 4096, 8192, 65536, 69632, 4096, 1 * MiB, 4096, 512, 131072]


def start(tmp, image, direct):
    f = {"driver": "file", "filename": str(image)}
    if direct:
        f["cache"] = {"direct": True}
    node = json.dumps({"driver": "qcow2", "node-name": "n0", "file": f})
    return start_daemon(tmp, image, blockdev=node)


def pipeline(c, reqs):
    """Send every request in one burst (from a thread, so replies are read meanwhile) and return
    {cookie: (error, data)} for all of them."""
    blob = bytearray()
    for cookie, (cmd, off, ln, flags, data) in reqs.items():
        blob += (0x25609513).to_bytes(4, "big") + flags.to_bytes(2, "big") + cmd.to_bytes(2, "big")
        blob += cookie.to_bytes(8, "big") + off.to_bytes(8, "big") + ln.to_bytes(4, "big") + data
    err = []

    def send():
        try:
            c.send(bytes(blob))
        except OSError as e:  # reported by the reply loop's failure too
            err.append(e)

    t = threading.Thread(target=send)
    t.start()
    out = {}
    try:
        for _ in range(len(reqs)):
            cookie, e, data = c.reply(read_len=None)
            assert cookie in reqs and cookie not in out, cookie
            out[cookie] = (e, data)
    finally:
        t.join()
    assert not err, err
    return out


def client_work(sock, half, seed, model, results):
    try:
        rnd = random.Random(seed)
        c = RawClient(sock, timeout=120)
        c.greet()
        c.go("exp", structured=True)
        base, end = half * SIZE // 2, (half + 1) * SIZE // 2
        for rnd_no in range(3):
            reqs, off, cookie = {}, base, 1
            while off < end:
                ln = min(rnd.choice(SIZES), end - off)
                data = bytes([(rnd_no * 31 + half * 7 + (off >> 9)) % 251 + 1]) * ln
                flags = FLAG_FUA if rnd.random() < 0.15 else 0
                reqs[cookie] = (CMD_WRITE, off, ln, flags, data)
                model[off:off + ln] = data
                cookie += 1
                if rnd.random() < 0.1:
                    reqs[cookie] = (CMD_FLUSH, 0, 0, 0, b"")
                    cookie += 1
                off += ln
            for k, (e, _) in pipeline(c, reqs).items():
                assert e == 0, f"request {k} {reqs[k][:3]} failed: {e}"
            # read back, pipelined, in pieces of varying size
            reqs, off = {}, base
            while off < end:
                ln = min(rnd.choice(SIZES), end - off)
                reqs[cookie] = (CMD_READ, off, ln, 0, b"")
                cookie += 1
                off += ln
            for k, (e, data) in pipeline(c, reqs).items():
                _, o, ln, _, _ = reqs[k]
                assert e == 0, f"read {o}+{ln} failed: {e}"
                assert data == bytes(model[o:o + ln]), f"read {o}+{ln}: wrong data"
        c.disc()
        c.close()
        results[half] = None
    except BaseException as e:  # noqa: BLE001 - handed to the test thread
        results[half] = e


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o_direct"])
def test_pipelined_two_connections(tmp, direct):
    img = tmp / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    # a partly allocated image: the first quarter of each half is written, the rest is not
    qemu_io("-f", "qcow2", "-c", f"write -q -P 0x5a 0 {SIZE // 8}",
            "-c", f"write -q -P 0x5b {SIZE // 2} {SIZE // 8}", str(img))
    model = bytearray(SIZE)
    model[0:SIZE // 8] = b"\x5a" * (SIZE // 8)
    model[SIZE // 2:SIZE // 2 + SIZE // 8] = b"\x5b" * (SIZE // 8)
    try:
        d = start(tmp, img, direct)
    except AssertionError as e:
        if direct and "O_DIRECT" in str(e):
            pytest.skip("the file system of the temporary directory does not support O_DIRECT")
        raise
    try:
        results = {}
        threads = [threading.Thread(target=client_work, args=(d.sock, h, 1000 + h, model, results))
                   for h in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for h in (0, 1):
            if results.get(h) is not None:
                raise results[h]
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
    ref = tmp / "model.raw"
    ref.write_bytes(bytes(model))
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img), str(ref), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_qemu_check_clean(str(img))
