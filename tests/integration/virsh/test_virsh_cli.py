"""The virsh-like online commands of `vdisk` (blockcopy, blockpull, blockcommit, blockjob,
snapshot-create, domblklist) against a live daemon serving a qcow2 chain over NBD.

Every test runs against qemu-storage-daemon 7.2 (the oracle: same QMP) and against vdiskd; a
vdiskd case fails, naming the command, when vdiskd does not register a QMP command the test
needs. Results are checked with qemu-img / qemu-io: guest-visible content against a raw
reference taken before the job, the destination's backing chain, and writes made through the NBD
export afterwards landing in the image the export was pivoted to.
"""
import json
import random
import re
import subprocess
import threading
import time

import pytest

from conftest import VDISK, VDISKD, qemu_img, qemu_io, unix_listening
from qmp_client import Daemon, QMPClient
from nbd_helpers import RawClient, CMD_WRITE, CMD_WZ, CMD_FLUSH

MiB = 1 << 20
SIZE = 8 * MiB


SERVERS = ["qsd", "vdiskd"]


def run_vdisk(*args, check=True, timeout=60):
    """vdisk with its output kept byte-exact (text mode would turn the progress "\r" into "\n")."""
    p = subprocess.run([VDISK, *map(str, args)], capture_output=True, timeout=timeout)
    p.stdout, p.stderr = p.stdout.decode(), p.stderr.decode()
    if check and p.returncode != 0:
        raise AssertionError(f"vdisk {args} exited {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def progress_re(label):
    # virsh's "\r%s: [%5.2f %%]": " 0.00", "45.00", "100.00"
    return re.compile(r"^(\r%s: \[(?:[ \d]\d|100)\.\d\d %%\])+$" % re.escape(label))


class Server:
    """A daemon serving disk0 (the top of `top`) as NBD export exp0, with a QMP socket."""

    def __init__(self, kind, tmp, top):
        self.kind = kind
        self.tmp = tmp
        self.qmp = str(tmp / "qmp.sock")
        self.nbd = str(tmp / "nbd.sock")
        node = json.dumps({"driver": "qcow2", "node-name": "disk0",
                           "file": {"driver": "file", "filename": str(top)}})
        common = ["--blockdev", node, "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                  "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on"]
        if kind == "qsd":
            argv = ["qemu-storage-daemon", "--chardev",
                    f"socket,path={self.qmp},server=on,wait=off,id=m", "--monitor", "chardev=m",
                    *common]
        else:
            argv = [VDISKD, "--qmp", self.qmp, *common]
        self.d = Daemon(argv, self.qmp, str(tmp / f"{kind}.log"))
        # the path exists from bind(), before listen(): wait for the listening socket
        end = time.time() + 30
        while not unix_listening(self.nbd):
            assert self.d.proc.poll() is None and time.time() < end, \
                "NBD socket not listening:\n" + self.d.output()
            time.sleep(0.02)

    def uri(self):
        return f"nbd+unix:///disk0?socket={self.nbd}"

    def commands(self):
        with QMPClient(self.qmp) as q:
            return {c["name"] for c in q.cmd("query-commands")}

    def require(self, *cmds):
        missing = sorted(set(cmds) - self.commands())
        if missing:
            self.stop()
            # vdiskd implements every command these tests use: a missing one is a regression.
            assert self.kind != "vdiskd", f"vdiskd lacks QMP {', '.join(missing)}"
            pytest.skip(f"{self.kind} does not implement QMP {', '.join(missing)}")

    def run(self, *args, check=True, timeout=60):
        return run_vdisk(*args, "--socket", self.qmp, check=check, timeout=timeout)

    def stop(self):
        self.d.kill()

    # `with Server(...) as srv:` stops the daemon however the body ends
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture(params=SERVERS)
def kind(request):
    return request.param


def make_chain(tmp, layers=2):
    """base: 0x11 in [0,2M), 0x33 in [6M,7M); mid (3 layers): 0x44 in [1M,3M);
    top: 0x22 in [2M,4M) and zeroes at 6M+64K. Returns (paths bottom..top, raw reference)."""
    paths = [tmp / "base.qcow2"]
    qemu_img("create", "-q", "-f", "qcow2", paths[0], SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {2 * MiB}", "-c",
            f"write -P 0x33 {6 * MiB} {MiB}", paths[0])
    if layers == 3:
        mid = tmp / "mid.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
        qemu_io("-f", "qcow2", "-c", f"write -P 0x44 {MiB} {2 * MiB}", mid)
        paths.append(mid)
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", paths[-1].name, "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {2 * MiB} {2 * MiB}", "-c",
            f"write -z {6 * MiB + 65536} 65536", top)
    paths.append(top)
    ref = tmp / "ref.raw"
    qemu_img("convert", "-O", "raw", top, ref)
    return paths, ref


def same_content(img, ref):
    p = qemu_img("compare", "-U", "-F", "raw", img, ref, check=False)
    assert p.returncode == 0, f"{img} differs from {ref}:\n{p.stdout}{p.stderr}"


def backing_of(img):
    info = json.loads(qemu_img("info", "-U", "--output=json", img).stdout)
    return info.get("backing-filename")


def recorded(kind, path):
    """How a job records path as a backing name: QEMU absolute (the images were opened by
    absolute paths), vdiskd relative to the image whose header names it (issue 9, item 6)."""
    return str(path) if kind == "qsd" else path.name


def domblklist(srv, details=False):
    args = ["domblklist"] + (["--details"] if details else [])
    out = srv.run(*args).stdout
    lines = out.split("\n")
    # virsh's table: header, dashes, rows, then the blank line virsh ends a command with
    assert lines[0].split() == (["Target", "Node", "Format", "Source"] if details
                                else ["Target", "Source"]), out
    assert set(lines[1]) == {"-"}, out
    assert out.endswith("\n\n"), repr(out)
    return [ln.split() for ln in lines[2:] if ln.strip()]


def guest_write_then_stop(srv, pattern, offset):
    """A write through the export after the job, then stop the daemon (files closed)."""
    qemu_io("-f", "raw", "-c", f"write -P {pattern} {offset} 65536", srv.uri())
    srv.stop()


# ------------------------------------------------------------------ blockcopy

def test_blockcopy_full_pivot(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("drive-mirror", "query-block-jobs", "block-job-complete")
        p = srv.run("blockcopy", "exp0", tmp / "copy.qcow2", "--pivot", "--verbose")
        assert p.stdout == "\nSuccessfully pivoted\n"
        assert progress_re("Block Copy").match(p.stderr), repr(p.stderr)
        assert p.stderr.endswith("\rBlock Copy: [100.00 %]")
        rows = domblklist(srv)
        assert rows == [["exp0", str(tmp / "copy.qcow2")]]
        guest_write_then_stop(srv, 0x5a, 5 * MiB)
    assert backing_of(tmp / "copy.qcow2") is None  # full copy: flattened
    with open(ref, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x5a" * 65536)
    same_content(tmp / "copy.qcow2", ref)
    # the source chain was left alone: the guest write went to the copy only
    p = qemu_io("-f", "qcow2", "-c", f"read -P 0 {5 * MiB} 65536", top, check=False)
    assert "Pattern verification failed" not in p.stdout, p.stdout


def test_blockcopy_shallow_finish(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("drive-mirror", "query-block-jobs", "block-job-cancel")
        p = srv.run("blockcopy", "exp0", tmp / "copy.qcow2", "--shallow", "--finish",
                    "--granularity", "65536", "--buf-size", "1048576", "--synchronous-writes")
        assert p.stdout == "\nSuccessfully copied\n"
        assert p.stderr == ""
        # --finish does not pivot: the export still serves the original top
        assert domblklist(srv) == [["exp0", str(top)]]
        assert srv.run("blockjob", "exp0", "--info").stdout == "No current block job for exp0\n"
    assert backing_of(tmp / "copy.qcow2") == recorded(kind, base)  # shares the backing chain
    same_content(tmp / "copy.qcow2", ref)
    # only the top layer was copied: the base's 0x11 data is not allocated in the copy
    m = json.loads(qemu_img("map", "-U", "--output=json", tmp / "copy.qcow2").stdout)
    assert all(e["depth"] >= 1 for e in m if e["start"] < MiB and e["data"]), m


class NbdGuest(threading.Thread):
    """A guest writing through the export until stopped: one NBD connection, one request at a
    time (random writes of patterns 1..0x4f, some write-zeroes), each applied to the model once
    acknowledged. Every request must succeed. Writes fall in [lo, hi)."""

    def __init__(self, sock, model, seed, lo=0, hi=SIZE):
        super().__init__(daemon=True)
        self.sock, self.model, self.rng = sock, model, random.Random(seed)
        self.lo, self.hi = lo, hi
        self.done, self.errors, self.exc = 0, [], None
        self.stop_ev = threading.Event()

    def run(self):
        try:
            c = RawClient(self.sock, timeout=30)
            c.greet()
            c.go("disk0", structured=False)
            while not self.stop_ev.is_set():
                ln = self.rng.randrange(1, min(128 * 1024, self.hi - self.lo))
                off = self.rng.randrange(self.lo, self.hi - ln)
                if self.rng.random() < 0.85:
                    data = bytes([self.rng.randrange(1, 0x50)]) * ln
                    c.request(CMD_WRITE, off, ln, self.done + 1, 0, data)
                else:
                    data = bytes(ln)
                    c.request(CMD_WZ, off, ln, self.done + 1)
                cookie, err, _ = c.reply()
                assert cookie == self.done + 1, (cookie, self.done)
                if err:
                    self.errors.append((off, ln, err))
                else:
                    self.model[off:off + ln] = data
                self.done += 1
            c.request(CMD_FLUSH, 0, 0, 1 << 40)
            assert c.reply()[:2] == (1 << 40, 0)
            c.disc()
            c.close()
        except BaseException as e:  # reported by stop_checked
            self.exc = e

    def wait_writes(self, n, timeout=60):
        """Wait (event-driven, generous deadline) until n more writes were acknowledged."""
        target, end = self.done + n, time.time() + timeout
        while self.done < target:
            assert self.is_alive() and time.time() < end, (self.done, target, self.exc)
            time.sleep(0.01)

    def stop_checked(self):
        self.stop_ev.set()
        self.join(60)
        assert not self.is_alive(), "guest writer hung"
        if self.exc:
            raise self.exc
        assert self.errors == [], self.errors[:10]


def test_blockcopy_raw_pivot_under_guest_writes(kind, tmp):
    """blockcopy --raw (virsh: the same as --format raw) onto a new file, --pivot, while a guest
    keeps writing through the export: the destination is a raw image (no qcow2 header: its bytes
    are the disk) holding exactly what the guest wrote, before, during and after the pivot; the
    source chain gets none of the writes made after the pivot."""
    (base, top), ref = make_chain(tmp)
    dest = tmp / "copy.raw"
    srv = Server(kind, tmp, top)
    g = None
    try:
        srv.require("drive-mirror", "query-block-jobs", "block-job-complete")
        model = bytearray(ref.read_bytes())
        g = NbdGuest(srv.nbd, model, seed=7)
        g.start()
        g.wait_writes(20)  # the guest is writing before the job starts ...
        p = srv.run("blockcopy", "exp0", dest, "--raw", "--pivot", "--verbose", timeout=120)
        assert p.stdout == "\nSuccessfully pivoted\n", (p.stdout, p.stderr)
        assert progress_re("Block Copy").match(p.stderr), repr(p.stderr)
        assert g.is_alive(), g.exc  # ... never stopped during the copy and the pivot ...
        assert domblklist(srv) == [["exp0", str(dest)]]
        g.wait_writes(20)  # ... and goes on, on the destination now
        g.stop_checked()
        g = None
        # What the guest reads through the export is the model ...
        seen = tmp / "seen.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri(), seen)
        assert seen.read_bytes() == bytes(model), "guest view after the pivot differs"
        # ... and a last write lands in the destination only (0xee: never a writer pattern).
        model[5 * MiB:5 * MiB + 65536] = b"\xee" * 65536
        guest_write_then_stop(srv, 0xee, 5 * MiB)
    finally:
        if g is not None:
            g.stop_ev.set()
            g.join(60)
        srv.stop()
    info = json.loads(qemu_img("info", "--output=json", dest).stdout)
    assert info["format"] == "raw" and info["virtual-size"] == SIZE, info
    data = dest.read_bytes()
    assert not data.startswith(b"QFI\xfb"), "the destination is a qcow2 image, not raw"
    assert len(data) == SIZE and data == bytes(model), "destination differs from the guest's disk"
    qemu_img("check", "-q", top)
    p = qemu_io("-f", "qcow2", "-r", "-c", f"read -P 0xee {5 * MiB} 65536", top, check=False)
    assert "Pattern verification failed" in p.stdout, "a write after the pivot reached the source"


def test_blockcopy_reuse_external_wait_then_blockjob(kind, tmp):
    (base, top), ref = make_chain(tmp)
    dest = tmp / "pre.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", dest, SIZE)
    with Server(kind, tmp, top) as srv:
        srv.require("drive-mirror", "query-block-jobs", "block-job-complete",
                    "block-job-set-speed")
        p = srv.run("blockcopy", "exp0", dest, "--reuse-external", "--format", "qcow2", "--wait",
                    "--verbose")
        assert p.stdout == "\nNow in mirroring phase\n"
        assert p.stderr.endswith("\rBlock Copy: [100.00 %]")
        info = srv.run("blockjob", "exp0", "--info")
        assert info.stderr == "\rBlock Copy: [100.00 %]"
        assert info.stdout == "\n\n"
        assert srv.run("blockjob", "exp0", "--bandwidth", "2").stdout == "\n"
        info = srv.run("blockjob", "exp0")
        assert info.stdout == "    Bandwidth limit: 2097152 bytes/s (2.000 MiB/s)\n\n"
        raw = srv.run("blockjob", "exp0", "--raw").stdout
        assert raw.startswith(" type=Copy\n bandwidth=2\n cur="), raw
        srv.run("blockjob", "exp0", "--pivot")
        assert domblklist(srv) == [["exp0", str(dest)]]
        guest_write_then_stop(srv, 0x66, 0)
    with open(ref, "r+b") as f:
        f.write(b"\x66" * 65536)
    same_content(dest, ref)


def test_blockcopy_async_then_abort(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("drive-mirror", "query-block-jobs", "block-job-cancel")
        # 1 MiB/s over ~5 MiB of data: still running when we look
        p = srv.run("blockcopy", "exp0", tmp / "copy.qcow2", "--bandwidth", "1")
        assert p.stdout == "Block Copy started\n"
        info = srv.run("blockjob", "exp0", "--info")
        assert progress_re("Block Copy").fullmatch(info.stderr), repr(info.stderr)
        assert info.stdout == "    Bandwidth limit: 1048576 bytes/s (1.000 MiB/s)\n\n"
        assert srv.run("blockjob", "exp0", "--abort").stdout == "\n"
        assert srv.run("blockjob", "exp0").stdout == "No current block job for exp0\n"
        assert domblklist(srv) == [["exp0", str(top)]]
    same_content(top, ref)


def test_blockcopy_timeout_aborts(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("drive-mirror", "query-block-jobs", "block-job-cancel")
        # ~5 MiB at 1 MiB/s cannot be ready within 1 s: virsh aborts the job on --timeout
        p = srv.run("blockcopy", "exp0", tmp / "copy.qcow2", "--bandwidth", "1", "--timeout", "1",
                    check=False)
        assert p.returncode == 1
        assert p.stdout == "\nCopy aborted\n"
        assert srv.run("blockjob", "exp0").stdout == "No current block job for exp0\n"
        assert domblklist(srv) == [["exp0", str(top)]]
    same_content(top, ref)


def test_blockcopy_sigint_aborts(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("drive-mirror", "query-block-jobs", "block-job-cancel")
        proc = subprocess.Popen([VDISK, "blockcopy", "exp0", str(tmp / "copy.qcow2"), "--wait",
                                 "--bandwidth", "1", "--socket", srv.qmp],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # vdisk installs its SIGINT handler before drive-mirror, which creates the target:
            # once the file exists, Ctrl-C must abort the job (it runs ~5 s at 1 MiB/s).
            end = time.time() + 30
            while not (tmp / "copy.qcow2").exists():
                assert proc.poll() is None and time.time() < end, proc.communicate(timeout=5)
                time.sleep(0.01)
            proc.send_signal(2)  # SIGINT, as Ctrl-C: virsh aborts the job
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1, (out, err)
        assert out.decode() == "\nCopy aborted\n" and err == b""
        assert srv.run("blockjob", "exp0").stdout == "No current block job for exp0\n"
        assert domblklist(srv) == [["exp0", str(top)]]
    same_content(top, ref)


# ------------------------------------------------------------------ blockpull

def test_blockpull_wait_verbose(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("block-stream", "query-block-jobs")
        p = srv.run("blockpull", "exp0", "--wait", "--verbose")
        assert p.stdout == "\nPull complete\n"
        assert progress_re("Block Pull").match(p.stderr), repr(p.stderr)
        assert p.stderr.endswith("\rBlock Pull: [100.00 %]")
        rows = domblklist(srv, details=True)
        assert [r[0] for r in rows] == ["exp0"], rows  # chain is one layer now
    assert backing_of(top) is None
    same_content(top, ref)


def test_blockpull_partial_base(kind, tmp):
    (base, mid, top), ref = make_chain(tmp, layers=3)
    with Server(kind, tmp, top) as srv:
        srv.require("block-stream", "query-block-jobs")
        p = srv.run("blockpull", "exp0", "--base", "exp0[2]", "--wait")
        assert p.stdout == "\nPull complete\n"
        assert p.stderr == ""
    assert backing_of(top) == recorded(kind, base)
    same_content(top, ref)


# ---------------------------------------------------------------- blockcommit

def test_blockcommit_active_pivot(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("block-commit", "query-block-jobs", "block-job-complete")
        p = srv.run("blockcommit", "exp0", "--active", "--pivot", "--verbose")
        assert p.stdout == "\nSuccessfully pivoted\n"
        assert progress_re("Block commit").match(p.stderr), repr(p.stderr)
        assert domblklist(srv) == [["exp0", str(base)]]
        guest_write_then_stop(srv, 0x77, 7 * MiB)
    with open(ref, "r+b") as f:
        f.seek(7 * MiB)
        f.write(b"\x77" * 65536)
    same_content(base, ref)


def test_blockcommit_active_wait_then_keep_overlay(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("block-commit", "query-block-jobs", "block-job-cancel")
        p = srv.run("blockcommit", "exp0", "--active", "--wait")
        assert p.stdout == "\nNow in synchronized phase\n"
        info = srv.run("blockjob", "exp0", "--info")
        assert info.stderr == "\rBlock Commit: [100.00 %]" and info.stdout == "\n\n"
        srv.run("blockjob", "exp0", "--abort")  # ready active commit: finish, no pivot
        assert srv.run("blockjob", "exp0").stdout == "No current block job for exp0\n"
        assert domblklist(srv) == [["exp0", str(top)]]
    same_content(base, ref)  # everything the guest sees is now in base too
    same_content(top, ref)


@pytest.mark.parametrize("base_args", [("--base", "exp0[2]"), ("--shallow",)])
def test_blockcommit_intermediate(kind, tmp, base_args):
    (base, mid, top), ref = make_chain(tmp, layers=3)
    with Server(kind, tmp, top) as srv:
        srv.require("block-commit", "query-block-jobs")
        # --top by file name; the base by libvirt's index notation, or --shallow (top's backing)
        p = srv.run("blockcommit", "exp0", "--top", mid, *base_args, "--wait", "--verbose")
        assert p.stdout == "\nCommit complete\n"
        assert p.stderr.endswith("\rBlock commit: [100.00 %]")
        rows = domblklist(srv, details=True)
        assert [r[0] for r in rows] == ["exp0", "exp0[1]"] and rows[1][3] == str(base), rows
    assert backing_of(top) == recorded(kind, base)
    same_content(top, ref)


def test_blockcommit_active_layer_needs_active(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        p = srv.run("blockcommit", "exp0", "--wait", check=False)
        assert p.returncode == 1
        assert p.stderr == "vdisk: error: commit of 'exp0' active layer requires active flag\n"
        assert p.stdout == ""


# ------------------------------------------------------------ snapshot-create

def test_snapshot_create(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        srv.require("blockdev-snapshot-sync")
        p = srv.run("snapshot-create", "exp0", tmp / "snap.qcow2", "--format", "qcow2")
        assert p.stdout == f"Disk snapshot {tmp / 'snap.qcow2'} created\n"
        rows = domblklist(srv, details=True)
        assert [(r[0], r[3]) for r in rows] == [("exp0", str(tmp / "snap.qcow2")),
                                                ("exp0[1]", str(top)), ("exp0[2]", str(base))]
        guest_write_then_stop(srv, 0x99, 0)
    assert backing_of(tmp / "snap.qcow2") == recorded(kind, top)
    same_content(top, ref)  # the old top is frozen
    with open(ref, "r+b") as f:
        f.write(b"\x99" * 65536)
    same_content(tmp / "snap.qcow2", ref)


# --------------------------------------------------------------------- errors

def test_errors_are_one_line(kind, tmp):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        p = srv.run("blockcopy", "nosuch", tmp / "x.qcow2", check=False)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr == ("vdisk: error: disk 'nosuch' not found (no export, node or image of "
                            "that name)\n")
        p = srv.run("blockcopy", "exp0", tmp / "x.qcow2", "--pivot", "--finish", check=False)
        assert p.returncode == 1
        assert p.stderr == "vdisk: error: Options --pivot and --finish are mutually exclusive\n"
        p = srv.run("blockpull", "exp0", "--verbose", check=False)
        assert p.stderr == "vdisk: error: Option --wait is required by option --verbose\n"
        p = srv.run("blockjob", "exp0", "--frob", check=False)
        assert p.returncode == 1
        assert p.stderr == ("vdisk: error: unrecognized option '--frob' (try 'vdisk blockjob "
                            "--help')\n")
        p = srv.run("blockjob", "exp0", "--bandwidth", "-1", check=False)
        assert p.stderr == ("vdisk: error: Numeric value '-1' for <bandwidth> option is "
                            "malformed or out of range\n")
        if "drive-mirror" in srv.commands():
            # a server-side error: the QMP error's desc, on one line
            p = srv.run("blockcopy", "exp0", tmp / "missing.qcow2", "--reuse-external",
                        check=False)
            assert p.returncode == 1 and p.stdout == ""
            assert p.stderr.startswith("vdisk: error: ") and p.stderr.count("\n") == 1, p.stderr
            assert "missing.qcow2" in p.stderr, p.stderr
    p = run_vdisk("domblklist", "--socket", tmp / "nope.sock", check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("vdisk: error: Failed to connect to QMP socket ")
    assert p.stderr.count("\n") == 1


def test_default_socket_from_env(kind, tmp, monkeypatch):
    (base, top), ref = make_chain(tmp)
    with Server(kind, tmp, top) as srv:
        monkeypatch.setenv("VDISK_SOCKET", srv.qmp)
        out = run_vdisk("domblklist").stdout
        assert out.split("\n")[2].split() == ["exp0", str(top)], out


# ------------------------------------------------- scripted QMP server (no daemon)

class FakeQmp:
    """A one-connection QMP server thread answering from a script: {command: handler(args, id)}
    where a handler returns the raw lines to send (events and/or the reply)."""

    def __init__(self, tmp, script, greeting=True):
        import socket
        import threading
        self.path = str(tmp / "fake.sock")
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.script = script
        self.greeting = greeting
        self.seen = []
        self.t = threading.Thread(target=self.serve, daemon=True)
        self.t.start()

    def serve(self):
        conn, _ = self.srv.accept()
        f = conn.makefile("rwb")
        try:
            if not self.greeting:
                f.write(b'{"hello": 1}\r\n')
                f.flush()
                return
            f.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
                    b'"package": "fake"}, "capabilities": []}}\r\n')
            f.flush()
            for line in f:
                req = json.loads(line)
                cmd, rid = req["execute"], req.get("id")
                self.seen.append((cmd, req.get("arguments", {})))
                if cmd == "qmp_capabilities":
                    out = [{"return": {}, "id": rid}]
                elif cmd in self.script:
                    out = self.script[cmd](req.get("arguments", {}), rid)
                    if out is None:
                        return  # hang up
                else:
                    out = [{"id": rid, "error": {"class": "CommandNotFound",
                                                 "desc": f"The command {cmd} has not been found"}}]
                # several messages in one write: the client must split them
                f.write(b"".join(json.dumps(m).encode() + b"\r\n" for m in out))
                f.flush()
        finally:
            conn.close()

    def close(self):
        self.srv.close()


def ev(name, **data):
    return {"timestamp": {"seconds": 1, "microseconds": 2}, "event": name, "data": data}


FAKE_GRAPH = {
    "query-block-exports": lambda a, i: [{"return": [{"type": "nbd", "id": "exp0",
                                                      "node-name": "disk0",
                                                      "shutting-down": False}], "id": i}],
    "query-named-block-nodes": lambda a, i: [{"return": [
        {"node-name": "disk0", "drv": "qcow2", "file": "/img/top.qcow2", "backing_file_depth": 1,
         "image": {"filename": "/img/top.qcow2", "format": "qcow2",
                   "backing-image": {"filename": "/img/base.qcow2", "format": "qcow2"}}},
        {"node-name": "b0", "drv": "qcow2", "file": "/img/base.qcow2", "backing_file_depth": 0,
         "image": {"filename": "/img/base.qcow2", "format": "qcow2"}}], "id": i}],
}


def test_fake_job_failure_event_before_reply(tmp):
    """The job's end event arrives before the command's reply (QEMU's order): not lost."""
    script = dict(FAKE_GRAPH)
    script["block-stream"] = lambda a, i: [
        ev("JOB_STATUS_CHANGE", id="disk0", status="running"),
        ev("BLOCK_JOB_COMPLETED", device="disk0", type="stream", len=10, offset=5, speed=0,
           error="Input/output error"),
        {"return": {}, "id": i}]
    script["query-block-jobs"] = lambda a, i: [{"return": [], "id": i}]
    fake = FakeQmp(tmp, script)
    try:
        p = run_vdisk("blockpull", "exp0", "--base", "exp0[1]", "--wait", "--socket", fake.path,
                      check=False)
    finally:
        fake.close()
    assert p.returncode == 1
    assert p.stdout == "\nPull failed\n"
    assert p.stderr == "vdisk: error: block pull failed: Input/output error\n"
    assert ("block-stream", {"job-id": "disk0", "device": "disk0", "base-node": "b0"}) in fake.seen


def test_fake_server_hangs_up(tmp):
    script = dict(FAKE_GRAPH)
    script["drive-mirror"] = lambda a, i: None
    fake = FakeQmp(tmp, script)
    try:
        p = run_vdisk("blockcopy", "/img/top.qcow2", "/img/c.qcow2", "--bandwidth", "3",
                      "--socket", fake.path, check=False)
    finally:
        fake.close()
    assert p.returncode == 1
    assert p.stderr == "vdisk: error: QMP connection closed by the server\n"
    cmd, args = fake.seen[-1]
    assert cmd == "drive-mirror" and args == {
        "job-id": "disk0", "device": "disk0", "target": "/img/c.qcow2", "sync": "full",
        "speed": 3 * MiB}  # no mode: the daemon's default (vdiskd: relative backing names)


@pytest.mark.parametrize("fmt_args", [("--raw",), ("--format", "raw")])
def test_fake_blockcopy_raw_is_format_raw(tmp, fmt_args):
    """virsh's --raw is an alias of --format raw: drive-mirror gets "format": "raw" either way."""
    script = dict(FAKE_GRAPH)
    script["drive-mirror"] = lambda a, i: None
    fake = FakeQmp(tmp, script)
    try:
        p = run_vdisk("blockcopy", "/img/top.qcow2", "/img/c.raw", *fmt_args, "--socket",
                      fake.path, check=False)
    finally:
        fake.close()
    assert p.returncode == 1
    assert p.stderr == "vdisk: error: QMP connection closed by the server\n"
    cmd, args = fake.seen[-1]
    assert cmd == "drive-mirror" and args == {
        "job-id": "disk0", "device": "disk0", "target": "/img/c.raw", "sync": "full",
        "format": "raw"}, args


def test_fake_not_qmp(tmp):
    fake = FakeQmp(tmp, {}, greeting=False)
    try:
        p = run_vdisk("domblklist", "--socket", fake.path, check=False)
    finally:
        fake.close()
    assert p.returncode == 1
    assert p.stderr.startswith("vdisk: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "QMP greeting" in p.stderr, p.stderr
