"""Host-to-host live copy over a real link: two network namespaces joined by a veth pair stand for
hosts A and B (addresses exist only inside them), a tbf qdisc limits the rate, nbdkit's nbd plugin
with the delay filter adds latency. vdiskd on B serves an empty qcow2 target whose backing is B's own
copy of base; vdiskd on A mirrors the guest's top onto it (drive-mirror sync=top onto the existing
export, as libvirt migrates storage) while the guest writes over NBD; after the pivot the guest runs
from B and B's image is byte-exact, and base's data never crossed the link (nbdkit's log filter on
the proxy records every write sent to B).
"""
import contextlib
import json
import os
import random
import re
import subprocess
import time

import pytest

from conftest import qemu_img, qemu_io, run, vdisk
from blockops_helpers import Guest, assert_same, guest_read, image_content, write_cmds
from netns_helpers import A_ADDR, B_ADDR, two_hosts, vdiskd_in

MiB = 1 << 20
SIZE = 24 * MiB


def vdiskd_serving(ns, tmp, name, image, nbd_addr, export="id=exp0,name=disk0", *extra):
    """vdiskd in ns with the qcow2 image as node disk0, exported writable over NBD at nbd_addr
    (--nbd-server's addr.* keyvals); export: the export's id and name."""
    return vdiskd_in(ns, tmp, name, "--blockdev", json.dumps({
        "driver": "qcow2", "node-name": "disk0",
        "file": {"driver": "file", "filename": str(image)}}),
        "--nbd-server", nbd_addr,
        "--export", f"type=nbd,{export},node-name=disk0,writable=on", *extra)


def proxy_writes(logfile):
    """(offset, count) of every write and write-zeroes nbdkit's log filter saw reach B."""
    pat = re.compile(r"connection=\d+ (?:Write|Zero) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)")
    with open(logfile) as f:
        return [(int(m[1], 16), int(m[2], 16)) for m in pat.finditer(f.read())]


def wait_unix(path, proc, timeout=20):
    end = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "process exited early"
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("via", ["qmp", "virsh"])
def test_shallow_live_copy_to_another_host_with_guest_writing(tmp, via):
    """via=qmp: drive-mirror with the guest writing while copying and while ready; via=virsh: the
    README's `vdisk blockcopy ... --pivot` after the guest wrote (one blocking command)."""
    # base: 0x11 in [0, 8M) (both hosts have it); the guest's top: 0x22 in [10M, 12M).
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {8 * MiB}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {10 * MiB} {2 * MiB}", top)
    model = bytearray(SIZE)
    model[0:8 * MiB] = b"\x11" * (8 * MiB)
    model[10 * MiB:12 * MiB] = b"\x22" * (2 * MiB)
    hostb = tmp / "hostb"
    hostb.mkdir()
    bbase, btgt = hostb / "base.qcow2", hostb / "disk.qcow2"
    subprocess.run(["cp", str(base), str(bbase)], check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", btgt)

    procs = []
    rng = random.Random(7)
    with two_hosts() as (nsa, nsb):
        try:
            db = vdiskd_serving(nsb, tmp, "b", btgt,
                                f"addr.type=inet,addr.host={B_ADDR},addr.port=10809",
                                "id=in0,name=incoming")
            procs.append(db)
            # The link's latency: a delaying NBD proxy on A in front of B.
            proxy_sock, proxy_log = str(tmp / "proxy.sock"), str(tmp / "proxy.log")
            proxy = subprocess.Popen(
                ["ip", "netns", "exec", nsa, "nbdkit", "-f", "-U", proxy_sock,
                 "--filter=log", "--filter=delay", "nbd", f"logfile={proxy_log}", f"hostname={B_ADDR}", "port=10809", "export=incoming",
                 "delay-read=5ms", "delay-write=5ms", "delay-zero=5ms"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_unix(proxy_sock, proxy)
            sock = str(tmp / "guest.sock")
            da = vdiskd_serving(nsa, tmp, "a", top, f"addr.type=unix,addr.path={sock}")
            procs.append(da)
            uri = f"nbd+unix:///disk0?socket={sock}"
            q = da.client()
            # Guest writes stay out of base's range [0, 8M).
            target = f"nbd+unix:///incoming?socket={proxy_sock}"
            if via == "qmp":
                # As libvirt migrates storage: drive-mirror onto the existing NBD export. B's
                # export reads base where its own layer is empty: the caller vouches for that.
                q.cmd("drive-mirror", job_id="mv", device="disk0", sync="top", mode="existing",
                      format="raw", target=target, speed=2 * MiB, x_backing_matches=True)
            g = Guest(uri, write_cmds(model, rng, 40, 0, lo=8 * MiB, hi=SIZE))
            g.start()
            g.join_checked(120)
            if via == "qmp":
                q.cmd("block-job-set-speed", device="mv", speed=0)
                q.get_event("BLOCK_JOB_READY", timeout=120)
                g = Guest(uri, write_cmds(model, rng, 20, 60, lo=8 * MiB, hi=SIZE))
                g.start()
                g.join_checked(120)
                q.cmd("block-job-complete", device="mv")
                done = q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
                assert "error" not in done["data"], done
            else:
                p = vdisk("blockcopy", "--socket", da.qmp_path, "disk0", target, "--shallow",
                          "--reuse-external", "--backing-matches", "--raw", "--verbose",
                          "--pivot", timeout=120)
                assert "Successfully pivoted" in p.stdout, p.stdout
            frozen = bytes(model)
            # Shallow: base's [0, 8M) is on B already, so no write to it crossed the link; the
            # top's 2M and the guest's writes did.
            sent = proxy_writes(proxy_log)
            assert not [w for w in sent if w[0] < 8 * MiB], sent[:10]
            assert sum(c for o, c in sent if 10 * MiB <= o < 12 * MiB) >= 2 * MiB, sent[:10]
            # The guest now runs from host B: these writes travel over the link.
            g = Guest(uri, write_cmds(model, rng, 20, 120, lo=8 * MiB, hi=SIZE))
            g.start()
            g.join_checked(120)
            q.close()
            da.stop_checked()
            procs.remove(da)
            db.stop_checked()
            procs.remove(db)
        finally:
            for d in procs:
                d.kill()
            if "proxy" in locals() and proxy.poll() is None:
                proxy.terminate()
                proxy.wait(timeout=15)
    got = tmp / "b.raw"
    qemu_img("convert", "-O", "raw", btgt, got)
    assert_same(got.read_bytes(), bytes(model), "host B's disk after the move")
    a_now = tmp / "a.raw"
    qemu_img("convert", "-O", "raw", top, a_now)
    assert_same(a_now.read_bytes(), frozen, "host A's disk after the pivot")
    # B's disk is still its own overlay on its own base (the move did not flatten it).
    info = json.loads(qemu_img("info", "--output=json", btgt).stdout)
    assert info["backing-filename"] == "base.qcow2", info
    # ... and holds none of base's clusters itself.
    own = json.loads(qemu_img("map", "--output=json", btgt).stdout)
    assert not [e for e in own if e["depth"] == 0 and e["data"] and e["start"] < 8 * MiB], own


# ---- post-copy: the guest moves to B first, B pulls the rest from A ----

A_PORT = "10810"


def link_proxy(nsa, tmp, a_sock, export="disk0-ro"):
    """A's read-only export (A's copy stays as it was at the switch) on A's address for B, with
    the link's latency and a log of what B read."""
    log = str(tmp / "link.log")
    p = subprocess.Popen(
        ["ip", "netns", "exec", nsa, "nbdkit", "-f", "-i", A_ADDR, "-p", A_PORT,
         "--filter=log", "--filter=delay", "nbd", f"socket={a_sock}", f"export={export}",
         f"logfile={log}", "delay-read=5ms"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + 20
    while not os.path.exists(log) or "Ready" not in open(log).read():
        assert p.poll() is None and time.time() < end, "link proxy did not start"
        time.sleep(0.05)
    return p, log


def read_bytes_logged(logfile):
    pat = re.compile(r"connection=\d+ Read id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)")
    with open(logfile) as f:
        return sum(int(m[1], 16) for m in pat.finditer(f.read()))


@contextlib.contextmanager
def post_copy_setup(tmp, rng, link_options=""):
    """Host A runs the guest's disk (the guest writes to it); host B gets an empty overlay whose
    backing is A's disk over NBD (link_options: the nbd URI's query, "?reconnect-delay=..").
    Yields (ctx dict); everything is stopped after."""
    disk = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, SIZE)
    model = bytearray(SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x44 {MiB} {6 * MiB}", disk)
    model[MiB:7 * MiB] = b"\x44" * (6 * MiB)
    hostb = tmp / "hostb"
    hostb.mkdir()
    ov = hostb / "disk.qcow2"
    # Unsafe (-u): B's backing is only reachable from B's namespace.
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"nbd://{A_ADDR}:{A_PORT}/disk0-ro{link_options}",
             "-F", "raw", ov, SIZE)
    procs, proxy = [], None
    with two_hosts() as (nsa, nsb):
        try:
            a_sock = str(tmp / "a.sock")
            da = vdiskd_serving(nsa, tmp, "a", disk, f"addr.type=unix,addr.path={a_sock}",
                                "id=exp0,name=disk0",
                                "--export", "type=nbd,id=ro,node-name=disk0,name=disk0-ro")
            procs.append(da)
            a_uri = f"nbd+unix:///disk0?socket={a_sock}"
            g = Guest(a_uri, write_cmds(model, rng, 30, 0, lo=0, hi=SIZE))
            g.start()
            g.join_checked(120)
            proxy, link_log = link_proxy(nsa, tmp, a_sock)
            ctx = {"nsa": nsa, "nsb": nsb, "da": da, "disk": disk, "ov": ov, "model": model,
                   "frozen": bytes(model), "proxy": proxy, "link_log": link_log, "procs": procs}

            def switch():
                """The guest's disk on B: the overlay over A's export, served to the guest."""
                b_sock = str(tmp / "b.sock")
                before = read_bytes_logged(link_log)
                db = vdiskd_serving(nsb, tmp, "b", ov, f"addr.type=unix,addr.path={b_sock}")
                procs.append(db)
                ctx["switch_read"] = read_bytes_logged(link_log) - before
                return db, f"nbd+unix:///disk0?socket={b_sock}"

            ctx["switch"] = switch
            yield ctx
            for d in list(procs):
                d.stop_checked()
                procs.remove(d)
        finally:
            for d in procs:
                d.kill()
            if proxy and proxy.poll() is None:
                # kill: after a link loss nbdkit may wait for a half-open connection of B's.
                proxy.kill()
                proxy.wait(timeout=15)


def test_post_copy_guest_runs_on_b_while_b_pulls_the_rest_from_a(tmp):
    """Post-copy: the guest switches to B at once (nothing copied at the switch), reads what B has
    not pulled yet from A over the link, writes on B; block-stream pulls the rest while the guest
    writes, then B's disk stands alone and the link to A is gone. A's disk stays frozen."""
    rng = random.Random(11)
    with post_copy_setup(tmp, rng) as ctx:
        model = ctx["model"]
        db, b_uri = ctx["switch"]()
        # The switch itself moved nothing: B only opened A's export.
        assert ctx["switch_read"] < MiB, ctx["switch_read"]
        # Before any pull, the guest on B reads A's disk (through the link), byte for byte.
        assert_same(guest_read(tmp, b_uri), ctx["frozen"], "the guest's disk on B at the switch")
        assert read_bytes_logged(ctx["link_log"]) >= 6 * MiB  # ... read over the link
        # The README's pull (block-stream), the guest writing meanwhile.
        g = Guest(b_uri, write_cmds(model, rng, 40, 100, lo=0, hi=SIZE))
        g.start()
        p = vdisk("blockpull", "--socket", db.qmp_path, "disk0", "--bandwidth", "8", "--wait",
                  "--verbose", timeout=120)
        assert "Pull complete" in p.stdout, p.stdout
        g.join_checked(120)
        qb = db.client()
        # The pull dropped the backing: no node on B reads A any more, so the link can go.
        nodes = qb.cmd("query-named-block-nodes")
        assert not [n for n in nodes if n.get("drv") == "nbd" or "nbd:" in n.get("file", "")], nodes
        ctx["proxy"].kill()
        ctx["proxy"].wait(timeout=15)
        g = Guest(b_uri, write_cmds(model, rng, 20, 200, lo=0, hi=SIZE))
        g.start()
        g.join_checked(120)
        assert_same(guest_read(tmp, b_uri), bytes(model), "the guest's disk on B after the pull")
        qb.close()
    info = json.loads(qemu_img("info", "--output=json", ctx["ov"]).stdout)
    assert "backing-filename" not in info, info
    assert_same(image_content(tmp, ctx["ov"], "b.raw"), bytes(model), "B's image")
    assert_same(image_content(tmp, ctx["disk"], "a.raw"), ctx["frozen"], "A's image (frozen)")


def test_post_copy_link_to_a_fails_midway_the_guest_sees_eio_never_wrong_data(tmp):
    """The link to A drops while B is still pulling: the pull fails, the guest's reads of what B
    has not pulled fail with EIO, everything else reads right; B's own data is intact."""
    rng = random.Random(12)
    with post_copy_setup(tmp, rng) as ctx:
        model = ctx["model"]
        db, b_uri = ctx["switch"]()
        qb = db.client()
        qb.cmd("block-stream", job_id="pull", device="disk0", speed=2 * MiB)
        end = time.time() + 60
        while True:
            jobs = qb.cmd("query-block-jobs")
            assert jobs and time.time() < end, jobs
            if jobs[0]["offset"] > 0:
                break
            time.sleep(0.05)
        ctx["proxy"].kill()  # the link to A is gone
        ctx["proxy"].wait(timeout=15)
        done = qb.get_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" in done["data"], done
        # The guest keeps writing whole clusters on B (no read of A needed).
        for i, off in enumerate(range(20 * MiB, 22 * MiB, 64 * 1024)):
            qemu_io("-f", "raw", "-c", f"write -P {0x60 + i % 16} {off} 64k", b_uri)
            model[off:off + 65536] = bytes([0x60 + i % 16]) * 65536
        failed = ok = 0
        b_sock = b_uri.split("socket=")[1]
        for off in range(0, SIZE, MiB):
            part = tmp / "part.raw"
            spec = json.dumps({"driver": "raw", "offset": off, "size": MiB, "file": {
                "driver": "nbd", "server": {"type": "unix", "path": b_sock},
                "export": "disk0"}})
            p = run(["qemu-img", "convert", "-O", "raw", f"json:{spec}", str(part)],
                    check=False, timeout=60)
            if p.returncode != 0:
                assert "Input/output error" in p.stdout + p.stderr, p.stderr
                failed += 1
            else:
                assert_same(part.read_bytes(), bytes(model[off:off + MiB]), f"B at {off}")
                ok += 1
        assert failed > 0 and ok > 0, (failed, ok)
        qb.close()


def test_post_copy_link_to_a_lost_midway_with_reconnect_delay_is_a_pause_then_the_pull_ends(tmp):
    """The backing URI has reconnect-delay and a 2 s stall timeout: the link to A goes silent
    (A's end of the veth set down) while B pulls; the guest's reads of what B has not pulled wait
    (a pause, not an error), and once the link is back they return A's data and the pull ends."""
    rng = random.Random(13)
    with post_copy_setup(tmp, rng, "?reconnect-delay=300&x-stall-timeout=2") as ctx:
        model = ctx["model"]
        db, b_uri = ctx["switch"]()
        # The guest writes on B first (whole and partial clusters).
        g = Guest(b_uri, write_cmds(model, rng, 20, 300, lo=0, hi=SIZE))
        g.start()
        g.join_checked(120)
        qb = db.client()
        qb.cmd("block-stream", job_id="pull", device="disk0", speed=2 * MiB)
        end = time.time() + 60
        while True:
            jobs = qb.cmd("query-block-jobs")
            assert jobs and time.time() < end, jobs
            if jobs[0]["offset"] > 0:
                break
            time.sleep(0.05)
        run(["ip", "-n", ctx["nsa"], "link", "set", "va", "down"], timeout=30)
        out = tmp / "during.raw"
        reader = subprocess.Popen(["qemu-img", "convert", "-O", "raw", b_uri, str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        end = time.time() + 90
        while "no progress" not in db.output():
            assert time.time() < end and reader.poll() is None, db.output()
            time.sleep(0.05)
        assert reader.poll() is None, "the guest's read did not wait for the link"
        run(["ip", "-n", ctx["nsa"], "link", "set", "va", "up"], timeout=30)
        msg, _ = reader.communicate(timeout=240)
        assert reader.returncode == 0, msg
        assert_same(out.read_bytes(), bytes(model), "what the guest read across the pause")
        qb.cmd("block-job-set-speed", device="pull", speed=0)
        done = qb.get_event("BLOCK_JOB_COMPLETED", timeout=240)
        assert "error" not in done["data"], done
        assert "reconnected" in db.output()
        qb.close()
    info = json.loads(qemu_img("info", "--output=json", ctx["ov"]).stdout)
    assert "backing-filename" not in info, info
    assert_same(image_content(tmp, ctx["ov"], "b.raw"), bytes(model), "B's image")
    assert_same(image_content(tmp, ctx["disk"], "a.raw"), ctx["frozen"], "A's image (frozen)")


def test_post_copy_leaves_the_shared_base_on_b(tmp):
    """Post-copy of a disk over a base both hosts hold: A exports its top layer's *file* (the
    qcow2's bytes) read-only; B opens it as a qcow2 over NBD whose backing is B's own base, under
    B's overlay. The guest writes on A, switches to B, writes on B during the pull; block-stream
    down to B's base pulls only A's top layer. Nothing of base crosses the link: what B read
    through it is at most A's top file, which is smaller than base's data."""
    rng = random.Random(14)
    # base: 0x11 in [0, 16M) (both hosts hold it); the guest's top on A: 0x22 in [18M, 19M).
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {16 * MiB}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {18 * MiB} {MiB}", top)
    model = bytearray(SIZE)
    model[0:16 * MiB] = b"\x11" * (16 * MiB)
    model[18 * MiB:19 * MiB] = b"\x22" * MiB
    hostb = tmp / "hostb"
    hostb.mkdir()
    bbase, ov = hostb / "base.qcow2", hostb / "disk.qcow2"
    subprocess.run(["cp", str(base), str(bbase)], check=True)
    # B's overlay names B's base; at open its backing is A's top over NBD (the --blockdev below),
    # and the pull down to base leaves the header as it is written here.
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(bbase), "-F", "qcow2", ov, SIZE)
    procs, proxy = [], None
    with two_hosts() as (nsa, nsb):
        try:
            a_sock = str(tmp / "a.sock")
            da = vdiskd_in(nsa, tmp, "a", "--blockdev", json.dumps({
                "driver": "qcow2", "node-name": "disk0",
                "file": {"driver": "file", "node-name": "disk0-file", "filename": str(top)}}),
                "--nbd-server", f"addr.type=unix,addr.path={a_sock}",
                "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
                "--export", "type=nbd,id=top,node-name=disk0-file,name=disk0-top")
            procs.append(da)
            a_uri = f"nbd+unix:///disk0?socket={a_sock}"
            g = Guest(a_uri, write_cmds(model, rng, 30, 0, lo=12 * MiB, hi=SIZE))
            g.start()
            g.join_checked(120)
            # The switch: the guest's last flush on A (a migration stops and flushes the guest),
            # so A's top file holds its metadata; from here A's disk is frozen.
            qemu_io("-f", "raw", "-c", "flush", a_uri)
            frozen = bytes(model)
            proxy, link_log = link_proxy(nsa, tmp, a_sock, "disk0-top")
            b_sock = str(tmp / "b.sock")
            db = vdiskd_in(nsb, tmp, "b", "--blockdev", json.dumps({
                "driver": "qcow2", "node-name": "base", "read-only": True,
                "file": {"driver": "file", "filename": str(bbase)}}),
                "--blockdev", json.dumps({
                    "driver": "qcow2", "node-name": "a-top", "read-only": True,
                    "file": {"driver": "nbd", "export": "disk0-top", "server": {
                        "type": "inet", "host": A_ADDR, "port": A_PORT}},
                    "backing": "base"}),
                "--blockdev", json.dumps({
                    "driver": "qcow2", "node-name": "disk0",
                    "file": {"driver": "file", "filename": str(ov)}, "backing": "a-top"}),
                "--nbd-server", f"addr.type=unix,addr.path={b_sock}",
                "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
            procs.append(db)
            b_uri = f"nbd+unix:///disk0?socket={b_sock}"
            assert_same(guest_read(tmp, b_uri), frozen, "the guest's disk on B at the switch")
            before_pull = read_bytes_logged(link_log)
            g = Guest(b_uri, write_cmds(model, rng, 40, 100, lo=0, hi=SIZE))
            g.start()
            p = vdisk("blockpull", "--socket", db.qmp_path, "disk0", "--base", "base",
                      "--bandwidth", "4", "--wait", "--verbose", timeout=120)
            assert "Pull complete" in p.stdout, p.stdout
            g.join_checked(120)
            qb = db.client()
            # disk0 now reads base under it; the node made by --blockdev stays until deleted
            # (as in QEMU), and deleting it, which nothing uses any more, closes the link to A.
            assert qb.cmd("query-named-block-nodes")  # a-top is still there ...
            qb.cmd("blockdev-del", node_name="a-top")
            nodes = qb.cmd("query-named-block-nodes")
            assert not [n for n in nodes if n.get("drv") == "nbd" or n["node-name"] == "a-top"], \
                nodes
            qb.close()
            proxy.kill()
            proxy.wait(timeout=15)
            assert_same(guest_read(tmp, b_uri), bytes(model), "the guest's disk on B after the pull")
            pulled = read_bytes_logged(link_log) - before_pull
            for d in list(procs):
                d.stop_checked()
                procs.remove(d)
        finally:
            for d in procs:
                d.kill()
            if proxy and proxy.poll() is None:
                proxy.kill()
                proxy.wait(timeout=15)
    # What the pull (and the guest's reads meanwhile) fetched is A's top layer - its file's data
    # clusters and metadata - not base's 16 MiB, which only B's base supplies.
    assert 0 < pulled <= os.path.getsize(top) < 16 * MiB, (pulled, os.path.getsize(top))
    info = json.loads(qemu_img("info", "--output=json", ov).stdout)
    assert info.get("full-backing-filename", info.get("backing-filename")) == str(bbase), info
    assert_same(image_content(tmp, ov, "b.raw"), bytes(model), "B's image over B's base")
    assert_same(image_content(tmp, top, "a.raw"), frozen, "A's image (frozen)")
