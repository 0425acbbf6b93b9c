#!/usr/bin/python3
"""Crash campaign against vdiskd (make crash-campaign TRIALS=N).

Each trial: a qcow2 chain base <- mid <- top served by vdiskd over NBD; a guest (a small NBD
client here) writes random 4 KiB blocks and flushes every few writes, remembering which writes a
completed flush covered; an operation may start over QMP (none, block-stream of mid into top,
block-commit of mid into base, an active commit of top without completing it, drive-mirror of top
to a new file without completing it, a mirror killed inside its pivot (block-job-complete sent,
the kill a few milliseconds later), a blockdev-snapshot-sync killed while it creates the overlay
and switches the guest onto it); vdiskd is killed with SIGKILL at a random moment. Then:
qemu-img check finds no corruption in any image (leaked clusters are allowed, as QEMU's), and the
guest's disk (top's chain, read by qemu-img) holds every flushed write, while a block written after
the last flush reads as one of the values it may have. Where the kill may have come before or after
a switch (pivot, snapshot), the guest's disk is whichever side of it the daemon was on: one of the
two (the mirror's copy or top; the new overlay or top) must hold every flushed write, and every
image that qemu-img can open must be clean (a new overlay cut off while being created may not
open at all: then the switch did not happen and top must hold everything).
A `transaction` trial snapshots three guests' disks in one QMP transaction (with bitmaps) and
kills inside it; what it checks is in trial_transaction. CRASH_OPS=a,b runs only those operations.
Exits 1 on the first failure, with the seed.
"""
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VDISKD = os.path.join(os.environ.get("VDISK_BUILD", os.path.join(ROOT, "build")), "src/tools/vdiskd")
BLK = 4096
SIZE = 16 << 20
NBLK = SIZE // BLK
OPS = ["writes", "stream", "commit", "active-commit", "mirror", "pivot", "snapshot",
       "transaction"]
TX_DISKS = 3  # disks snapshotted by one transaction


class Nbd:
    """Just enough of an NBD client: fixed newstyle, NBD_OPT_GO, simple replies."""

    def __init__(self, path, name=b"disk"):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(path)
        self.recv(18)  # NBDMAGIC, IHAVEOPT, handshake flags
        self.s.sendall(struct.pack(">I", 3))
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
        while True:
            _, _, rtype, ln = struct.unpack(">QIII", self.recv(20))
            self.recv(ln)
            if rtype == 1:  # NBD_REP_ACK
                break
            if rtype & 0x80000000:
                raise OSError("NBD_OPT_GO refused")
        self.handle = 0

    def recv(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise OSError("NBD server closed")
            b += c
        return b

    def request(self, typ, off=0, data=b"", length=None):
        self.handle += 1
        ln = len(data) if length is None else length
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, typ, self.handle, off, ln) + data)
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        if magic != 0x67446698 or handle != self.handle or err:
            raise OSError(f"NBD error {err}")

    def write(self, off, data):
        self.request(1, off, data)

    def flush(self):
        self.request(3, length=0)


class Guest(threading.Thread):
    """Writes until the daemon dies; history[i] = (block, value); durable = writes a flush covered."""

    def __init__(self, path, rng, export=b"disk"):
        super().__init__(daemon=True)
        self.path, self.rng, self.export = path, rng, export
        self.history, self.durable = [], 0
        self.connected = threading.Event()

    def run(self):
        try:
            c = Nbd(self.path, self.export)
            self.connected.set()
            while True:
                for _ in range(self.rng.randrange(1, 8)):
                    b, v = self.rng.randrange(NBLK), self.rng.randrange(1, 256)
                    self.history.append((b, v))  # before the write: it may land or not
                    c.write(b * BLK, bytes([v]) * BLK)
                n = len(self.history)
                c.flush()
                self.durable = n
        except OSError:
            pass


def run(*cmd, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd}: {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def wait_listening(path, proc):
    """Until a connection to path succeeds (bind() creates the path before listen())."""
    for _ in range(2000):
        if proc.poll() is not None:
            raise AssertionError(f"vdiskd exited {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                return
        except OSError:
            time.sleep(0.01)
    raise AssertionError(f"{path}: vdiskd did not listen within 20 s")


def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    f = s.makefile("rw")
    f.readline()

    events = []

    def send(command, **args):
        args = {k.replace("_", "-"): v for k, v in args.items()}
        f.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        f.flush()

    def cmd(command, **args):
        send(command, **args)
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                return r
            events.append(r["event"])

    def wait_event(name):
        """Until the event (bounded by the socket's 30 s timeout per line, 1000 lines)."""
        for _ in range(1000):
            if name in events:
                return
            r = json.loads(f.readline())
            if "event" in r:
                events.append(r["event"])
        raise AssertionError(f"no {name}")
    cmd("qmp_capabilities")
    cmd.send = send
    cmd.wait_event = wait_event
    return s, cmd


def kill9(p, guest, qmp_sock):
    """SIGKILL the daemon, then let the guests notice (their next request fails) and stop."""
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    for g in guest if isinstance(guest, list) else [guest]:
        g.join(timeout=30)
    qmp_sock.close()


def check_image(path):
    """qemu-img check of one image: its JSON, or None when it cannot be opened as qcow2."""
    c = run("qemu-img", "check", "-U", "-f", "qcow2", "--output=json", path, check=False)
    if c.returncode == 1 and "Could not open" in c.stderr:
        return None
    assert c.returncode in (0, 3), f"{path}: qemu-img check {c.returncode}\n{c.stdout}{c.stderr}"
    return json.loads(c.stdout)


def trial_transaction(d, rng):
    """TX_DISKS guests, each on its own chain base_i <- top_i with a persistent bitmap; one
    transaction snapshots every top (blockdev-snapshot-sync) and adds a bitmap to each; SIGKILL
    0-250 ms after it is sent (inside the overlays' creation or the switches).

    What the disk shows afterwards, and must: the transaction prepares (creates) every overlay
    before it switches any disk, so a guest write reaches an overlay only once all overlays are
    complete qcow2 images on top of their disk's top. Management's rule after a crash is
    therefore: every overlay complete (opens as qcow2, backing = that top) -> the transaction
    happened, each disk is its overlay's chain; any overlay missing or cut off -> it did not,
    each disk is its top. Checked: every image that opens is clean (leaks allowed); no overlay
    holds data unless every overlay is complete; each disk, chosen by that rule, holds every
    flushed write of its guest and no torn block."""
    nsock, qsock = os.path.join(d, "nbd.sock"), os.path.join(d, "qmp.sock")
    tops, snaps, initial = [], [], bytearray(SIZE)
    initial[:SIZE // 2] = b"\x07" * (SIZE // 2)
    args = [VDISKD, "--qmp", qsock, "--nbd-server", f"addr.type=unix,addr.path={nsock}"]
    for i in range(TX_DISKS):
        base, top = os.path.join(d, f"base{i}.qcow2"), os.path.join(d, f"top{i}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {SIZE // 2}", base)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        tops.append(top)
        snaps.append(os.path.join(d, f"snap{i}.qcow2"))
        args += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": f"top{i}", "file": {
            "driver": "file", "filename": top}}),
            "--export", f"type=nbd,id=e{i},node-name=top{i},name=disk{i},writable=on"]
    log = open(os.path.join(d, "vdiskd.log"), "w")
    p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        for path in (nsock, qsock):
            wait_listening(path, p)
        s, cmd = qmp(qsock)
        for i in range(TX_DISKS):
            r = cmd("block-dirty-bitmap-add", node=f"top{i}", name="b", persistent=True)
            assert "return" in r, r
        guests = [Guest(nsock, rng, f"disk{i}".encode()) for i in range(TX_DISKS)]
        for g in guests:
            g.start()
        for g in guests:
            assert g.connected.wait(30), "a guest could not connect"
        time.sleep(rng.uniform(0, 0.3))
        actions = [{"type": "blockdev-snapshot-sync", "data": {
            "node-name": f"top{i}", "snapshot-file": snaps[i], "snapshot-node-name": f"snap{i}",
            "format": "qcow2"}} for i in range(TX_DISKS)]
        actions += [{"type": "block-dirty-bitmap-add", "data": {"node": f"top{i}", "name": "t"}}
                    for i in range(TX_DISKS)]
        cmd.send("transaction", actions=actions)  # no waiting for the reply: kill inside
        time.sleep(rng.uniform(0, 0.25))
        kill9(p, guests, s)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    leaks = 0
    for i in range(TX_DISKS):
        for img in (os.path.join(d, f"base{i}.qcow2"), tops[i]):
            c = check_image(img)
            assert c is not None, f"{img} cannot be opened"
            leaks += c.get("leaks", 0)
    complete, with_data = 0, []
    for i, snap in enumerate(snaps):
        c = check_image(snap) if os.path.exists(snap) else None
        if c is None:
            continue  # not created yet, or cut off before its header
        leaks += c.get("leaks", 0)
        info = json.loads(run("qemu-img", "info", "-U", "--output=json", snap).stdout)
        if info.get("full-backing-filename", info.get("backing-filename")) == tops[i]:
            complete += 1
        if c.get("allocated-clusters", 0) > 0:
            with_data.append(i)
    assert not with_data or complete == TX_DISKS, \
        f"guest data in overlays {with_data} but only {complete} of {TX_DISKS} overlays complete"
    switched = complete == TX_DISKS
    for i, g in enumerate(guests):
        raw = os.path.join(d, "disk.raw")
        run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
            snaps[i] if switched else tops[i], raw)
        with open(raw, "rb") as f:
            err = model_error(f.read(), g, initial)
        assert err is None, f"disk {i} ({'overlay' if switched else 'top'}): {err}"
    return (sum(len(g.history) for g in guests), sum(g.durable for g in guests),
            bool(with_data), leaks, switched)


def trial(d, rng, op):
    base, mid, top = (os.path.join(d, n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {SIZE // 2}", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 9 {SIZE // 4} {SIZE // 2}", mid)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    initial = bytearray(SIZE)
    initial[:SIZE // 2] = b"\x07" * (SIZE // 2)
    initial[SIZE // 4:3 * SIZE // 4] = b"\x09" * (SIZE // 2)
    nsock, qsock = os.path.join(d, "nbd.sock"), os.path.join(d, "qmp.sock")
    log = open(os.path.join(d, "vdiskd.log"), "w")
    p = subprocess.Popen([VDISKD, "--qmp", qsock, "--blockdev", json.dumps(
        {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": top}}),
        "--nbd-server", f"addr.type=unix,addr.path={nsock}",
        "--export", "type=nbd,id=e0,node-name=top,name=disk,writable=on"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        for path in (nsock, qsock):
            wait_listening(path, p)
        s, cmd = qmp(qsock)
        guest = Guest(nsock, rng)
        guest.start()
        time.sleep(rng.uniform(0, 0.3))
        r = {"return": {}}
        if op == "stream":
            r = cmd("block-stream", device="top", job_id="j", base=base)
        elif op == "commit":
            r = cmd("block-commit", device="top", job_id="j", top=mid, base=base)
        elif op == "active-commit":
            r = cmd("block-commit", device="top", job_id="j", base=mid)
        elif op in ("mirror", "pivot"):
            r = cmd("drive-mirror", device="top", job_id="j", sync="full",
                    target=os.path.join(d, "copy.qcow2"), format="qcow2")
        assert "return" in r, (op, r)
        if op == "pivot":
            cmd.wait_event("BLOCK_JOB_READY")
            cmd.send("block-job-complete", device="j")  # no waiting for the reply: kill inside
            time.sleep(rng.uniform(0, 0.05))
        elif op == "snapshot":
            cmd.send("blockdev-snapshot-sync", node_name="top", format="qcow2",
                     snapshot_file=os.path.join(d, "snap.qcow2"), snapshot_node_name="snap")
            time.sleep(rng.uniform(0, 0.05))
        else:
            time.sleep(rng.uniform(0, 1.5))
        kill9(p, guest, s)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    # the images the guest's disk may be after a kill around a switch (the first: before it)
    switch_to = {"pivot": "copy.qcow2", "snapshot": "snap.qcow2"}.get(op)
    candidates = [top]
    leaks = 0  # leaked clusters over every image (allowed after a kill, as QEMU's)
    for img in os.listdir(d):
        if img.endswith(".qcow2"):
            c = run("qemu-img", "check", "-U", "-f", "qcow2", "--output=json",
                    os.path.join(d, img), check=False)
            if img == switch_to and c.returncode == 1 and "Could not open" in c.stderr:
                continue  # cut off while being created: the switch cannot have happened
            assert c.returncode in (0, 3), f"{img}: qemu-img check {c.returncode}\n{c.stdout}"
            leaks += json.loads(c.stdout).get("leaks", 0)
            if img == switch_to:
                candidates.append(os.path.join(d, img))
    errors = []
    for img in candidates:
        raw = os.path.join(d, "disk.raw")
        run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", img, raw)
        with open(raw, "rb") as f:
            err = model_error(f.read(), guest, initial)
        if err is None:
            return len(guest.history), guest.durable, img != top, leaks
        errors.append(f"{os.path.basename(img)}: {err}")
    raise AssertionError("; ".join(errors))


def model_error(disk, guest, initial, settled_from=None):
    """None if disk holds every flushed write and only values a block may have, else why not.
    Writes from index settled_from on (made after a restart, all landed) are certain again."""
    final, maybe = {}, {}
    for i, (b, v) in enumerate(guest.history):
        if i < guest.durable or (settled_from is not None and i >= settled_from):
            final[b] = v
            maybe.pop(b, None)
        else:
            maybe.setdefault(b, set()).add(v)
    for b in range(NBLK):
        got = disk[b * BLK:(b + 1) * BLK]
        ok = {final[b]} if b in final else {initial[b * BLK]}
        ok |= maybe.get(b, set())
        if not (got == bytes([got[0]]) * BLK and got[0] in ok):
            return f"block {b}: read {got[0]} (torn: {got != bytes([got[0]]) * BLK}), allowed {ok}"
    return None


def main():
    trials = int(os.environ.get("TRIALS", sys.argv[1] if len(sys.argv) > 1 else "5"))
    seed = int(os.environ.get("SEED", random.SystemRandom().randrange(1 << 31)))
    rng = random.Random(seed)
    ops = os.environ.get("CRASH_OPS", ",".join(OPS)).split(",")  # a subset, in turn
    assert set(ops) <= set(OPS), f"CRASH_OPS: known operations are {OPS}"
    counts = {op: 0 for op in ops}
    writes = flushed = leaks = leaky = 0
    switched = {"pivot": 0, "snapshot": 0, "transaction": 0}  # kill after a (first) switch
    tx_complete = 0  # transaction trials that had created every overlay before the kill
    for t in range(trials):
        op = ops[t % len(ops)]
        d = tempfile.mkdtemp(prefix="vdisk-crash-")
        try:
            if op == "transaction":
                w, f, after, lk, complete = trial_transaction(d, rng)
                tx_complete += complete
            else:
                w, f, after, lk = trial(d, rng, op)
        except KeyboardInterrupt:  # stopped (SIGINT): report the trials that completed
            shutil.rmtree(d, ignore_errors=True)
            trials = t
            print(f"crash-campaign: interrupted during trial {t}", flush=True)
            break
        except BaseException as e:
            print(f"crash-campaign: trial {t} ({op}) FAILED, seed {seed}, dir kept: {d}\n{e}")
            sys.exit(1)
        shutil.rmtree(d)
        counts[op] += 1
        writes += w
        flushed += f
        leaks += lk
        leaky += lk > 0
        if op in switched:
            switched[op] += after
        if (t + 1) % 50 == 0 and t + 1 < trials:
            print(f"crash-campaign: {t + 1} trials passed {counts}, switch passed in "
                  f"{switched}, {leaky} with leaked clusters (seed {seed})", flush=True)
    print(f"crash-campaign: {trials} trials {counts}, {writes} guest writes ({flushed} covered by "
          f"a completed flush), 0 corrupt images, 0 lost flushed writes (seed {seed}); the guest "
          f"was found on the far side of the switch in {switched['pivot']} pivot and "
          f"{switched['snapshot']} snapshot trials; {leaky} trials left leaked clusters "
          f"({leaks} in all, allowed as QEMU's); transaction of {TX_DISKS} snapshots: every "
          f"overlay created in {tx_complete}, guest data in an overlay in "
          f"{switched['transaction']}")


if __name__ == "__main__":
    main()
