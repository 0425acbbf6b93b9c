"""NBD protocol edge cases against vdiskd, with a raw-socket client (nbd_helpers.RawClient).

Each case checks the reply the spec asks for (or a clean disconnect of that client only) and that
the daemon still serves a well-behaved client afterwards.
"""
import os
import socket
import struct

import pytest

from conftest import qemu_img, qemu_io
import nbd_helpers as H

SIZE = 4 * 1024 * 1024


@pytest.fixture
def daemon(tmp):
    img = os.path.join(str(tmp), "disk.raw")
    qemu_img("create", "-f", "raw", img, SIZE)
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 64k", img)
    d = H.start_daemon(tmp, img, description="test, disk")
    try:
        yield d
        # whatever the test threw at it, the daemon shuts down cleanly (and sanitizer-clean)
        assert d.stop() == 0, d.output()
        assert "Sanitizer" not in d.output(), d.output()
    finally:
        d.kill()


def still_serves(d):
    c = H.RawClient(d.sock)
    try:
        c.greet()
        c.go()
        cookie, err, data = c.read(0, 4096, cookie=77)
        assert (cookie, err, data) == (77, 0, b"\x5a" * 4096)
    finally:
        c.close()


def test_unknown_export_go_and_export_name(daemon):
    c = H.RawClient(daemon.sock)
    c.greet()
    with pytest.raises(H.NbdError) as e:
        c.go("nope", structured=False)
    assert e.value.args[0] == H.REP_ERR_UNKNOWN
    # the session stays usable after an option error
    c.go("exp", structured=False)
    assert c.size == SIZE
    c.close()
    # NBD_OPT_EXPORT_NAME with an unknown name: the server can only hang up
    c = H.RawClient(daemon.sock)
    c.greet()
    c.opt(H.OPT_EXPORT_NAME, b"nope")
    assert c.closed_by_server()
    c.close()
    still_serves(daemon)


def test_export_name_option_no_zeroes(daemon):
    for cflags, tail in ((3, 0), (1, 124)):
        c = H.RawClient(daemon.sock)
        c.greet(cflags)
        c.opt(H.OPT_EXPORT_NAME, b"exp")
        size, tflags = struct.unpack(">QH", c.recv(10))
        assert size == SIZE and tflags & 1 and tflags & (1 << 8)  # HAS_FLAGS, CAN_MULTI_CONN
        assert c.recv(tail) == b"\0" * tail if tail else True
        cookie, err, data = c.read(0, 512, cookie=5)
        assert err == 0 and data == b"\x5a" * 512
        c.disc()
        assert c.closed_by_server()
        c.close()


def test_list_info_unknown_option_abort(daemon):
    c = H.RawClient(daemon.sock)
    c.greet()
    c.opt(H.OPT_LIST)
    reps = c.opt_replies()
    assert reps[-1][0] == H.REP_ACK
    servers = [r[1] for r in reps if r[0] == H.REP_SERVER]
    assert len(servers) == 1
    nl = struct.unpack(">I", servers[0][:4])[0]
    assert servers[0][4:4 + nl] == b"exp"
    # INFO with NAME + DESCRIPTION + BLOCK_SIZE requests
    c.opt(H.OPT_INFO, struct.pack(">I", 3) + b"exp" + struct.pack(">HHHH", 3, 1, 2, 3))
    reps = c.opt_replies()
    assert reps[-1][0] == H.REP_ACK
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in reps if t == H.REP_INFO}
    assert struct.unpack(">QH", infos[0])[0] == SIZE
    assert infos[1] == b"exp"
    assert infos[2] == b"test, disk"
    assert struct.unpack(">III", infos[3]) == (1, 4096, 32 * 1024 * 1024)
    # malformed INFO (count says 5 requests, none present)
    c.opt(H.OPT_INFO, struct.pack(">I", 3) + b"exp" + struct.pack(">H", 5))
    assert c.opt_replies()[-1][0] == H.REP_ERR_INVALID
    # unknown option
    c.opt(4242, b"junk")
    assert c.opt_replies()[-1][0] == H.REP_ERR_UNSUP
    # SET_META_CONTEXT before structured replies: invalid
    q = b"base:allocation"
    c.opt(H.OPT_SET_META, struct.pack(">I", 3) + b"exp" + struct.pack(">II", 1, len(q)) + q)
    assert c.opt_replies()[-1][0] == H.REP_ERR_INVALID
    c.opt(H.OPT_ABORT)
    assert c.opt_reply()[1] == H.REP_ACK
    assert c.closed_by_server()
    c.close()


def test_list_meta_context(daemon):
    c = H.RawClient(daemon.sock)
    c.greet()
    c.opt(H.OPT_STRUCTURED_REPLY)
    assert c.opt_replies()[-1][0] == H.REP_ACK
    c.opt(H.OPT_LIST_META, struct.pack(">I", 3) + b"exp" + struct.pack(">I", 0))
    reps = c.opt_replies()
    assert reps[-1][0] == H.REP_ACK
    assert [d[4:] for t, d in reps if t == H.REP_META] == [b"base:allocation"]
    q = b"qemu:dirty-bitmap:x"
    c.opt(H.OPT_SET_META, struct.pack(">I", 3) + b"exp" + struct.pack(">II", 1, len(q)) + q)
    reps = c.opt_replies()
    assert reps == [(H.REP_ACK, b"")]
    c.close()


def test_read_past_end_and_oversize(daemon):
    c = H.RawClient(daemon.sock)
    c.greet()
    c.go(structured=False)
    assert c.read(SIZE - 512, 1024, cookie=3)[:2] == (3, H.EINVAL)
    assert c.read(SIZE, 1, cookie=4)[:2] == (4, H.EINVAL)
    assert c.read(2**64 - 512, 1024, cookie=5)[:2] == (5, H.EINVAL)
    assert c.read(0, 64 * 1024 * 1024, cookie=6)[:2] == (6, H.EINVAL)
    # writes past the end: ENOSPC
    assert c.write(SIZE - 2, b"abcd", cookie=7)[:2] == (7, H.ENOSPC)
    # unknown command and unknown flag
    c.request(42, 0, 0, 8)
    assert c.reply()[:2] == (8, H.EINVAL)
    c.request(H.CMD_READ, 0, 512, 9, flags=0x8000)
    assert c.reply()[:2] == (9, H.EINVAL)
    # block status without a negotiated context
    c.request(H.CMD_BS, 0, 4096, 10)
    assert c.reply()[:2] == (10, H.EINVAL)
    # still in sync
    assert c.read(0, 4096, cookie=11) == (11, 0, b"\x5a" * 4096)
    c.close()
    # structured: read past end is an error chunk
    c = H.RawClient(daemon.sock)
    c.greet()
    c.go()
    assert c.read(SIZE - 512, 1024, cookie=12)[:2] == (12, H.EINVAL)
    assert c.read(0, 4096, cookie=13) == (13, 0, b"\x5a" * 4096)
    c.close()


def test_zero_length_requests(daemon):
    c = H.RawClient(daemon.sock)
    c.greet()
    c.go()
    assert c.write(0, b"", cookie=1)[:2] == (1, 0)
    assert c.read(100, 0, cookie=2)[:2] == (2, 0)
    c.request(H.CMD_TRIM, 0, 0, 3)
    assert c.reply()[:2] == (3, 0)
    assert c.read(0, 4096, cookie=4) == (4, 0, b"\x5a" * 4096)
    c.close()


def test_write_to_read_only_export(tmp):
    img = os.path.join(str(tmp), "ro.raw")
    qemu_img("create", "-f", "raw", img, SIZE)
    d = H.start_daemon(tmp, img, writable=False)
    try:
        c = H.RawClient(d.sock)
        c.greet()
        c.go()
        assert c.tflags & H.TF_READ_ONLY
        assert c.write(0, b"x" * 4096, cookie=1)[:2] == (1, H.EPERM)
        c.request(H.CMD_TRIM, 0, 4096, 2)
        assert c.reply()[:2] == (2, H.EPERM)
        c.request(H.CMD_WZ, 0, 4096, 3)
        assert c.reply()[:2] == (3, H.EPERM)
        assert c.read(0, 4096, cookie=4) == (4, 0, b"\0" * 4096)
        c.close()
        p = qemu_io("-f", "raw", "-c", "write 0 4k", d.uri(), check=False)
        assert p.returncode != 0 or "failed" in (p.stdout + p.stderr).lower()
    finally:
        d.kill()
    with open(img, "rb") as f:
        assert f.read(4096) == b"\0" * 4096


def test_32_pipelined_requests(daemon):
    c = H.RawClient(daemon.sock)
    c.greet()
    c.go(structured=False)
    # 32 writes of distinct patterns, sent back to back without waiting
    blob = b"".join(struct.pack(">IHHQQI", H.REQ_MAGIC, 0, H.CMD_WRITE, 1000 + i, i * 8192, 8192)
                    + bytes([i + 1]) * 8192 for i in range(32))
    c.send(blob)
    got = {}
    for _ in range(32):
        cookie, err, _ = c.reply()
        got[cookie] = err
    assert got == {1000 + i: 0 for i in range(32)}
    # 32 pipelined reads, replies may come in any order
    c.send(b"".join(struct.pack(">IHHQQI", H.REQ_MAGIC, 0, H.CMD_READ, 2000 + i, i * 8192, 8192)
                    for i in range(32)))
    for _ in range(32):
        magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
        assert magic == H.SIMPLE_MAGIC and err == 0
        assert c.recv(8192) == bytes([cookie - 2000 + 1]) * 8192
    c.close()


def test_disconnect_mid_payload(daemon):
    c = H.RawClient(daemon.sock)
    c.greet()
    c.go()
    c.send(struct.pack(">IHHQQI", H.REQ_MAGIC, 0, H.CMD_WRITE, 1, 0, 65536) + b"\xee" * 1000)
    c.close()
    c = H.RawClient(daemon.sock)
    c.greet()
    c.send(struct.pack(">QII", H.IHAVEOPT, H.OPT_GO, 100) + b"\0" * 10)
    c.close()
    still_serves(daemon)  # and the partial write was not applied


def test_garbage_handshake(daemon):
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\xff" * 4, b"\0\0\0\x03" + b"\x12" * 40):
        c = H.RawClient(daemon.sock)
        c.recv(18)
        c.send(junk)
        assert c.closed_by_server()
        c.close()
    # bad request magic after a good handshake
    c = H.RawClient(daemon.sock)
    c.greet()
    c.go()
    c.send(b"\xde\xad\xbe\xef" + b"\0" * 24)
    assert c.closed_by_server()
    c.close()
    # huge option length
    c = H.RawClient(daemon.sock)
    c.greet()
    c.send(struct.pack(">QII", H.IHAVEOPT, 4242, 0xFFFFFFFF))
    assert c.closed_by_server()
    c.close()
    still_serves(daemon)


def test_oversize_write_disconnects_only_that_client(daemon):
    good = H.RawClient(daemon.sock)
    good.greet()
    good.go()
    bad = H.RawClient(daemon.sock)
    bad.greet()
    bad.go()
    bad.request(H.CMD_WRITE, 0, 64 * 1024 * 1024, 1)
    assert bad.closed_by_server()
    bad.close()
    assert good.read(0, 4096, cookie=9) == (9, 0, b"\x5a" * 4096)
    good.close()


def test_write_zeroes_trim_block_status(daemon):
    c = H.RawClient(daemon.sock)
    c.greet()
    c.go(meta=True)
    assert c.write(1 << 20, b"\x11" * 65536, cookie=1, flags=H.FLAG_FUA)[:2] == (1, 0)
    c.request(H.CMD_WZ, 0, 65536, 2)  # may punch
    assert c.reply()[:2] == (2, 0)
    c.request(H.CMD_WZ, 1 << 20, 4096, 3, flags=H.FLAG_NO_HOLE)
    assert c.reply()[:2] == (3, 0)
    c.request(H.CMD_FLUSH, 0, 0, 4)
    assert c.reply()[:2] == (4, 0)
    c.request(H.CMD_CACHE, 0, 65536, 5)
    assert c.reply()[:2] == (5, 0)
    assert c.read(0, 65536, cookie=6) == (6, 0, b"\0" * 65536)
    assert c.read(1 << 20, 8192, cookie=7) == (7, 0, b"\0" * 4096 + b"\x11" * 4096)
    c.request(H.CMD_BS, 0, SIZE, 8)
    cookie, err, extents = c.reply()
    assert (cookie, err) == (8, 0)
    assert sum(l for l, _ in extents) == SIZE
    # the range we wrote data to is not reported as a hole
    pos = 0
    for l, f in extents:
        if pos <= (1 << 20) + 4096 < pos + l:
            assert not f & 1
        pos += l
    c.request(H.CMD_BS, 0, SIZE, 9, flags=H.FLAG_REQ_ONE)
    cookie, err, extents = c.reply()
    assert (cookie, err, len(extents)) == (9, 0, 1)
    c.request(H.CMD_BS, SIZE, 4096, 10)
    assert c.reply()[:2] == (10, H.EINVAL)
    # FAST_ZERO without WRITE_ZEROES is invalid
    c.request(H.CMD_TRIM, 0, 4096, 11, flags=H.FLAG_FAST_ZERO)
    assert c.reply()[:2] == (11, H.EINVAL)
    c.close()


def test_unix_socket_removed_and_exit_0(tmp):
    img = os.path.join(str(tmp), "d.raw")
    qemu_img("create", "-f", "raw", img, SIZE)
    d = H.start_daemon(tmp, img)
    try:
        assert d.stop() == 0, d.output()
        assert not os.path.exists(d.sock)
    finally:
        d.kill()


def test_client_not_reading_replies_does_not_stall_others(daemon):
    import time
    hog = H.RawClient(daemon.sock)
    hog.greet()
    hog.go(structured=False)
    hog.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # 100 reads of 1 MiB, never read back: fills every buffer between us and the server
    hog.send(b"".join(struct.pack(">IHHQQI", H.REQ_MAGIC, 0, H.CMD_READ, i, 0, 1 << 20)
                      for i in range(100)))
    time.sleep(0.3)
    t0 = time.time()
    for _ in range(5):
        still_serves(daemon)
    assert time.time() - t0 < 3
    # and shutdown does not wait for the hog for ever (it is cut off after a grace period of 5 s;
    # the bound leaves room for an ASan build's exit on a loaded machine)
    t0 = time.time()
    assert daemon.stop(timeout=30) == 0, daemon.output()
    assert time.time() - t0 < 20
    hog.close()


def test_concurrent_overlapping_writes_are_atomic_per_request(daemon):
    # two connections write overlapping 64k blocks of distinct patterns; every 64k region must end
    # up entirely one pattern (requests never interleave inside the tracked range)
    cs = []
    for k in range(2):
        c = H.RawClient(daemon.sock)
        c.greet()
        c.go(structured=False)
        cs.append(c)
    for rnd in range(10):
        for k, c in enumerate(cs):
            c.send(b"".join(struct.pack(">IHHQQI", H.REQ_MAGIC, 0, H.CMD_WRITE, i, i * 65536, 65536)
                            + bytes([k * 16 + rnd + 1]) * 65536 for i in range(8)))
        for c in cs:
            for _ in range(8):
                assert c.reply()[1] == 0
    c = cs[0]
    for i in range(8):
        _, err, data = c.read(i * 65536, 65536, cookie=100 + i)
        assert err == 0 and data == bytes([data[0]]) * 65536
    for c in cs:
        c.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_fast_zero(tmp, fmt):
    img = os.path.join(str(tmp), "fz." + fmt)
    qemu_img("create", "-f", fmt, img, SIZE)
    qemu_io("-f", fmt, "-c", "write -P 0x66 0 1M", img)
    d = H.start_daemon(tmp, img, fmt)
    try:
        c = H.RawClient(d.sock)
        c.greet()
        c.go()
        assert c.tflags & (1 << 11)  # SEND_FAST_ZERO
        results = {}
        for i, (off, ln) in enumerate([(0, 65536), (70000, 1000), (512 * 1024, 4096)]):
            c.request(H.CMD_WZ, off, ln, 10 + i, flags=H.FLAG_FAST_ZERO)
            cookie, err, _ = c.reply()
            assert cookie == 10 + i and err in (0, H.ENOTSUP), err
            _, rerr, data = c.read(off, ln, cookie=20 + i)
            assert rerr == 0
            # fast zero either did the whole job or nothing at all
            assert data == (b"\0" * ln if err == 0 else b"\x66" * ln)
            results[i] = err
        c.close()
        assert d.stop() == 0, d.output()
    finally:
        d.kill()


def test_random_garbage_fuzz(daemon):
    import random
    rng = random.Random(1234)
    for i in range(60):
        c = H.RawClient(daemon.sock, timeout=5)
        try:
            phase = i % 3
            if phase >= 1:
                c.greet()
            if phase == 2:
                c.go(structured=bool(i & 4))
            # random requests with valid magic and random fields, or pure noise
            for _ in range(rng.randint(1, 8)):
                if rng.random() < 0.7:
                    typ = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 99])
                    ln = rng.choice([0, 1, 512, 4096, 1 << 20, 2**32 - 1])
                    if typ == 1 and ln > 65536:
                        ln = 65536
                    off = rng.choice([0, 4095, SIZE - 1, SIZE, 2**63, 2**64 - 1])
                    hdr = struct.pack(">IHHQQI", H.REQ_MAGIC, rng.randint(0, 0xFFFF), typ,
                                      rng.getrandbits(64), off, ln)
                    c.send(hdr + (os.urandom(ln) if typ == 1 else b""))
                else:
                    c.send(os.urandom(rng.randint(1, 300)))
        except (OSError, EOFError, AssertionError, H.NbdError):
            pass  # the server may hang up on us at any point: that is allowed
        finally:
            c.close()
    still_serves(daemon)  # (seeded: no random write happens to succeed at offset 0)


def test_structured_read_holes_match_simple_read(daemon):
    # a mosaic of zero and data blocks, read at unaligned offsets both ways
    simple = H.RawClient(daemon.sock)
    simple.greet()
    simple.go(structured=False)
    st = H.RawClient(daemon.sock)
    st.greet()
    st.go(structured=True)
    base = 2 << 20
    for i in range(32):
        if i % 3 != 1:
            assert simple.write(base + i * 4096 + (i % 5) * 100, bytes([i + 1]) * 3000,
                                cookie=i)[1] == 0
    for off, ln in [(base, 131072), (base + 1, 100000), (base + 4095, 70001), (base + 8192, 4096),
                    (base - 4096, 8192 + 3), (0, 1)]:
        a = simple.read(off, ln, cookie=7)
        b = st.read(off, ln, cookie=8)
        assert a[1] == 0 and b[1] == 0
        assert len(b[2]) == ln and a[2] == b[2], (off, ln)
    # a large, mostly-zero structured read arrives as holes and reassembles exactly
    _, err, data = st.read(0, 4 * 1024 * 1024 - 4096, cookie=9)
    assert err == 0 and data[:65536] == b"\x5a" * 65536 and len(data) == 4 * 1024 * 1024 - 4096
    simple.close()
    st.close()


def test_malformed_requests_leave_a_qcow2_image_unmodified(tmp):
    """Malformed NBD traffic against a writable qcow2 export: every request is refused or the
    client dropped, and once vdiskd has stopped the image file is byte for byte what it was
    (sha256) and qemu-img check finds it clean."""
    from conftest import sha256, run
    img = os.path.join(str(tmp), "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, SIZE)
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x33 1M 64k", img)
    before = sha256(img)
    d = H.start_daemon(tmp, img, fmt="qcow2")
    hdr = struct.Struct(">IHHQQI")
    # (after handshake?, bytes sent) - each on its own connection; the server may answer with
    # an error or hang up, and neither may write anything.
    cases = [
        (True, hdr.pack(H.REQ_MAGIC, 0, H.CMD_WRITE, 1, SIZE - 2, 4) + b"abcd"),   # past the end
        (True, hdr.pack(H.REQ_MAGIC, 0, H.CMD_WRITE, 2, 2**64 - 512, 512) + b"\xee" * 512),
        (True, hdr.pack(H.REQ_MAGIC, 0, H.CMD_WRITE, 3, 0, 65536) + b"\xee" * 1000),  # cut off
        (True, hdr.pack(H.REQ_MAGIC, 0, H.CMD_WRITE, 4, 0, 64 << 20)),  # oversize payload
        (True, hdr.pack(H.REQ_MAGIC, 0x8000, H.CMD_WRITE, 5, 0, 512) + b"\xee" * 512),  # bad flag
        (True, hdr.pack(0xDEADBEEF, 0, H.CMD_WRITE, 6, 0, 512) + b"\xee" * 512),  # bad magic
        (True, hdr.pack(H.REQ_MAGIC, 0, H.CMD_WZ, 7, SIZE - 4096, 8192)),  # zeroes past the end
        (True, hdr.pack(H.REQ_MAGIC, 0, H.CMD_TRIM, 8, SIZE, 4096)),  # trim past the end
        (True, hdr.pack(H.REQ_MAGIC, 0x8000, H.CMD_WZ, 9, 0, 4096)),  # zeroes, unknown flag
        (True, hdr.pack(H.REQ_MAGIC, 0, H.CMD_WZ, 10, 0, 0xFFFFFFFF)),  # zeroes past the end
        (True, hdr.pack(H.REQ_MAGIC, 0, 42, 11, 0, 512) + b"\xee" * 512),  # unknown command
        (True, hdr.pack(H.REQ_MAGIC, 0, H.CMD_WRITE, 12, 0, 512)[:20]),  # header cut off
        (False, struct.pack(">QII", H.IHAVEOPT, H.OPT_GO, 0xFFFFFFFF)),  # handshake garbage
        (False, b"\xff" * 64),
    ]
    try:
        for after_go, data in cases:
            c = H.RawClient(d.sock, timeout=10)
            try:
                c.greet()
                if after_go:
                    c.go()
                c.send(data)
                c.s.shutdown(socket.SHUT_WR)
                while c.s.recv(65536):  # every reply, until the server hangs up
                    pass
            except OSError:
                pass  # the server hung up first: allowed
            finally:
                c.close()
        # still serving the unchanged data to a well-behaved client
        c = H.RawClient(d.sock)
        c.greet()
        c.go()
        assert c.read(0, 4096, cookie=1) == (1, 0, b"\x5a" * 4096)
        assert c.read(1 << 20, 4096, cookie=2) == (2, 0, b"\x33" * 4096)
        c.close()
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
    assert sha256(img) == before, "malformed NBD requests modified the image"
    run(["qemu-img", "check", "-f", "qcow2", img])
