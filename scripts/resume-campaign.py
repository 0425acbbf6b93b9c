#!/usr/bin/python3
"""Resume campaign: block jobs survive kill -9 of vdiskd (make resume-campaign TRIALS=N).

The trials take the job kinds in turn (RESUME_JOBS=mirror,stream,commit,active-commit: a subset).

Each trial: base <- top served by vdiskd --state-dir over NBD; a guest (a small NBD client)
writes random 4 KiB blocks and flushes now and then; drive-mirror sync=full copies top to a new
copy.qcow2 (sometimes under a speed limit, sometimes write-blocking); vdiskd is killed with
SIGKILL at a random moment, during the copy or once it is mirroring. Then, with vdiskd down,
"left" is measured from the files alone: the 64 KiB granules where copy.qcow2 (read on its own by
qemu-img) differs from top's chain. vdiskd is restarted with the same arguments: the job must be
listed PAUSED with vdisk-resumed; the guest reconnects and writes while it is paused and after
job-resume; once READY the guest stops and block-job-complete pivots. Checks: copy.qcow2 equals
top's chain byte for byte (qemu-img compare) and holds every write the guest's completed flushes
covered (and every write after the restart); qemu-img check finds no corruption; the bytes the
job copied after the restart are at most (left + what the guest dirtied after the restart, in
granules) x 1.1. Exits 1 on the first failure, with the seed and the trial's directory kept.

stream / commit / active-commit: base <- mid <- top, the guest writing to top; block-stream (base),
block-commit of mid into base, or active commit of top (and mid) into base, mostly under a speed
limit; kill -9 at a random moment (a stream or commit, capped at 2-8 MiB/s, at a random point of its
progress, so that the kill lands while it copies; an active commit at a random time, sometimes just
after block-job-complete, in or after its pivot). "left", from the files alone: stream - the bytes
of top's chain that mid still decides (qemu-img map); commit - the granules where base differs from
mid's chain; active - from top's chain. The restarted job must be PAUSED with vdisk-resumed, resume
and finish (active: READY, then complete); checks: the guest's disk (top's chain; base after the
pivot) holds every acknowledged write by the model, a commit's base holds what mid's chain read,
top's header names base at the end, qemu-img check of every image, no journal left, and the bytes
copied after the restart <= (left + dirtied) x 1.1. An active commit whose journal is gone after the
kill (it pivoted) must leave base holding every write its flushes covered.
"""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("crash_campaign",
                                               os.path.join(ROOT, "scripts", "crash-campaign.py"))
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)

VDISKD = cc.VDISKD
BLK, SIZE, NBLK = cc.BLK, cc.SIZE, cc.NBLK  # the crash campaign's disk and model
GRAN = 64 << 10


class Guest(threading.Thread):
    """Writes until stopped or the daemon dies; appends (block, value) to history before each
    write and advances durable past a completed flush (history is shared across restarts)."""

    def __init__(self, path, rng, history, state, pause=0.002, nblk=NBLK):
        super().__init__(daemon=True)
        self.path, self.rng, self.history, self.state = path, rng, history, state
        self.nblk = nblk  # writes blocks [0, nblk)
        self.pause = pause  # at most this long between two flushes
        self.stop = threading.Event()
        self.error = None

    def run(self):
        try:
            c = cc.Nbd(self.path)
            while not self.stop.is_set():
                for _ in range(self.rng.randrange(1, 8)):
                    b, v = self.rng.randrange(self.nblk), self.rng.randrange(1, 256)
                    self.history.append((b, v))
                    c.write(b * BLK, bytes([v]) * BLK)
                n = len(self.history)
                c.flush()
                self.state["durable"] = n
                time.sleep(self.rng.uniform(0, self.pause))
        except OSError as e:
            self.error = e


def start_daemon(d, top, state_dir):
    nsock, qsock = os.path.join(d, "nbd.sock"), os.path.join(d, "qmp.sock")
    log = open(os.path.join(d, "vdiskd.log"), "a")
    p = subprocess.Popen([VDISKD, "-v", "--qmp", qsock, "--state-dir", state_dir, "--blockdev",
                          json.dumps({"driver": "qcow2", "node-name": "top",
                                      "file": {"driver": "file", "filename": top}}),
                          "--nbd-server", f"addr.type=unix,addr.path={nsock}",
                          "--export", "type=nbd,id=e0,node-name=top,name=disk,writable=on"],
                         stdout=log, stderr=subprocess.STDOUT)
    log.close()
    for path in (nsock, qsock):
        cc.wait_listening(path, p)
    s, cmd = cc.qmp(qsock)
    return p, s, cmd, nsock


def block_job(cmd):
    r = cmd("query-block-jobs")
    assert "return" in r, r
    return next((j for j in r["return"] if j["device"] == "j"), None)


def wait_for(pred, what, limit=120):
    """Poll pred every 20 ms, at most `limit` seconds (bounded: 6000 polls)."""
    for _ in range(int(limit / 0.02)):
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def reap(p, guest=None):
    """Stops the guest and kills vdiskd if it still runs (a trial's way out on a failure)."""
    if guest:
        guest.stop.set()
    if p.poll() is None:
        p.kill()
        p.wait()


def wait_concluded(cmd):
    """The job's query-block-jobs entry once it has concluded."""
    return wait_for(lambda: (lambda b: b if b and b["status"] == "concluded" else None)(
        block_job(cmd)), "the job to conclude")


def finish_trial(p, s, cmd, state_dir, guest, complete):
    """Ends a trial's second run: stops the guest (it must not have failed), completes the job
    if `complete`, waits for it to conclude without an error, dismisses it (its journal must
    go) and quits vdiskd (exit 0). Returns the bytes the job copied after the restart."""
    if guest:
        guest.stop.set()
        guest.join(timeout=30)
        assert guest.error is None, f"guest failed after the restart: {guest.error}"
    if complete:
        r = cmd("block-job-complete", device="j")
        assert "return" in r, r
    done = wait_concluded(cmd)
    assert "error" not in done, done
    r = cmd("job-dismiss", id="j")
    assert "return" in r, r
    assert not os.listdir(state_dir), f"journal left at the end: {os.listdir(state_dir)}"
    cmd("quit")
    p.wait(timeout=60)
    assert p.returncode == 0, f"vdiskd exited {p.returncode}"
    s.close()
    return done["vdisk-copied-bytes"]


def check_copied(copied, left, dirtied):
    bound = (left + dirtied) * 1.1
    assert copied <= bound, (f"copied {copied} bytes after the restart, more than (left {left} + "
                             f"dirtied {dirtied}) x 1.1")


def raw_of(d, img, name):
    out = os.path.join(d, name)
    cc.run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", img, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def differing_granules(a, b):
    return sum(1 for g in range(0, SIZE, GRAN) if a[g:g + GRAN] != b[g:g + GRAN])


def make_chain(d, names, nines_off, nines_len):
    """The images names[0] <- names[1] <- ... in d (qcow2): 7s in the first half of the base,
    9s at [nines_off, +nines_len) in the second image. Returns their paths, a new state dir
    and the bytes the chain reads."""
    paths = [os.path.join(d, n) for n in names]
    cc.run("qemu-img", "create", "-q", "-f", "qcow2", paths[0], str(SIZE))
    cc.run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {SIZE // 2}", paths[0])
    for below, img in zip(paths, paths[1:]):
        cc.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2", img)
    cc.run("qemu-io", "-f", "qcow2", "-c", f"write -P 9 {nines_off} {nines_len}", paths[1])
    initial = bytearray(SIZE)
    initial[:SIZE // 2] = b"\x07" * (SIZE // 2)
    initial[nines_off:nines_off + nines_len] = b"\x09" * nines_len
    state_dir = os.path.join(d, "state")
    os.mkdir(state_dir)
    return paths, state_dir, initial


def trial_mirror(d, rng):
    (base, top), state_dir, initial = make_chain(d, ("base.qcow2", "top.qcow2"), SIZE // 4,
                                                 SIZE // 2)
    copy = os.path.join(d, "copy.qcow2")
    history, gstate = [], {"durable": 0}
    speed = rng.choice([0, 0, 8 << 20, 16 << 20])
    wb = rng.random() < 0.25
    quiet = rng.random() < 1 / 3
    p, s, cmd, nsock = start_daemon(d, top, state_dir)
    guest = None
    try:
        guest = Guest(nsock, rng, history, gstate)
        guest.start()
        time.sleep(rng.uniform(0, 0.2))
        args = {"device": "top", "job_id": "j", "sync": "full", "target": copy,
                "format": "qcow2", "auto_dismiss": False, "speed": speed}
        if wb:
            args["copy_mode"] = "write-blocking"
        r = cmd("drive-mirror", **args)
        assert "return" in r, r
        time.sleep(rng.uniform(0, 3.0))
        phase = (block_job(cmd) or {}).get("status", "?")
        cc.kill9(p, guest, s)
    finally:
        reap(p)
    kill_writes, durable_at_kill = len(history), gstate["durable"]
    # what the killed daemon left to copy, from the files alone
    left = differing_granules(raw_of(d, top, "src.raw"), raw_of(d, copy, "dst.raw")) * GRAN

    p, s, cmd, nsock = start_daemon(d, top, state_dir)
    try:
        j = block_job(cmd)
        assert j and j["status"] == "paused" and j.get("vdisk-resumed") is True, j
        # after the restart the guest writes more slowly (so that the bound below is not mostly
        # "dirtied"), or not at all in a third of the trials (then copied <= left x 1.1)
        guest = Guest(nsock, rng, history, gstate, pause=0.02) if quiet is False else None
        if guest:
            guest.start()
        time.sleep(rng.uniform(0, 0.3))  # guest writes while the job is paused
        r = cmd("job-resume", id="j")
        assert "return" in r, r
        wait_for(lambda: (block_job(cmd) or {}).get("ready"), "READY")
        time.sleep(rng.uniform(0, 0.3))
        copied = finish_trial(p, s, cmd, state_dir, guest, complete=True)
    finally:
        reap(p, guest)
    dirtied = (len(history) - kill_writes) * GRAN  # every write after the restart: one granule
    for img in (top, copy):
        c = cc.run("qemu-img", "check", "-U", "-f", "qcow2", img, check=False)
        assert c.returncode in (0, 3), f"{img}: qemu-img check {c.returncode}\n{c.stdout}"
    c = cc.run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", top, copy, check=False)
    assert c.returncode == 0, f"source and copy differ after the resume: {c.stdout}{c.stderr}"
    # writes the kill caught after the guest's last completed flush may or may not have
    # landed; every other write did (the second run's were all acknowledged before the pivot)
    err = cc.model_error(raw_of(d, copy, "final.raw"),
                         types.SimpleNamespace(history=history, durable=durable_at_kill),
                         initial, settled_from=kill_writes)
    assert err is None, f"copy.qcow2 does not hold the guest's writes: {err}"
    check_copied(copied, left, dirtied)
    return {"phase": phase, "left": left, "dirtied": dirtied, "copied": copied, "speed": speed,
            "wb": wb, "quiet": quiet, "resumed": True}


def mid_decides(top):
    """Bytes of top's chain that mid (depth 1) decides: what a stream to base has left."""
    m = json.loads(cc.run("qemu-img", "map", "-U", "--output=json", top).stdout)
    return sum(e["length"] for e in m if e.get("depth") == 1 and e.get("data"))


def check_all(d):
    for img in sorted(os.listdir(d)):
        if img.endswith(".qcow2"):
            c = cc.run("qemu-img", "check", "-U", "-f", "qcow2", os.path.join(d, img), check=False)
            assert c.returncode in (0, 3), f"{img}: qemu-img check {c.returncode}\n{c.stdout}"


def backing_of(img):
    info = json.loads(cc.run("qemu-img", "info", "-U", "--output=json", img).stdout)
    return info.get("full-backing-filename") or info.get("backing-filename")


def trial_chain(d, rng, kind):
    """stream / commit / active-commit (see the module's text)."""
    (base, mid, top), state_dir, initial = make_chain(
        d, ("base.qcow2", "mid.qcow2", "top.qcow2"), SIZE // 8, 3 * SIZE // 4)
    mid_view = bytes(initial)  # what mid's chain reads (the guest writes only to top)
    history, gstate = [], {"durable": 0}
    complete_first = kind == "active-commit" and rng.random() < 0.15
    # mostly slow enough to be killed in the middle; an active commit must converge (READY);
    # a stream or commit always copies for > 1 s (~12 MiB): the kill below lands while it runs
    if kind in ("stream", "commit"):
        speed = rng.choice([2 << 20, 4 << 20, 8 << 20])
    else:
        speed = 0 if complete_first else rng.choice([0, 4 << 20, 4 << 20, 8 << 20])
    quiet = rng.random() < 1 / 3
    # a stream has nothing left to copy where the guest wrote: it writes the first 2 MiB only
    nblk = NBLK // 8 if kind == "stream" else NBLK
    p, s, cmd, nsock = start_daemon(d, top, state_dir)
    guest = None
    try:
        guest = Guest(nsock, rng, history, gstate, nblk=nblk)
        guest.start()
        time.sleep(rng.uniform(0, 0.2))
        common = {"job_id": "j", "auto_dismiss": False, "speed": speed}
        if kind == "stream":
            r = cmd("block-stream", device="top", base=base, **common)
        elif kind == "commit":
            r = cmd("block-commit", device="top", top=mid, base=base, **common)
        else:
            r = cmd("block-commit", device="top", base=base, **common)
        assert "return" in r, r
        if complete_first:
            wait_for(lambda: (block_job(cmd) or {}).get("ready"), "READY")
            cmd.send("block-job-complete", device="j")  # kill inside or after the pivot
            time.sleep(rng.uniform(0, 0.05))
        elif kind in ("stream", "commit"):
            at = rng.uniform(0, 0.9)  # of the job's progress, not of a time it may outlive
            wait_for(lambda: (lambda b: not b or b["status"] != "running" or
                              b["offset"] >= at * b["len"])(block_job(cmd)), "the kill point")
        else:
            time.sleep(rng.uniform(0, 3.0))
        phase = "completing" if complete_first else (block_job(cmd) or {}).get("status", "?")
        cc.kill9(p, guest, s)
    finally:
        reap(p)
    kill_writes, durable_at_kill = len(history), gstate["durable"]
    model = types.SimpleNamespace(history=history, durable=durable_at_kill)
    if kind == "stream":
        left = mid_decides(top)
    else:
        src = raw_of(d, mid if kind == "commit" else top, "src.raw")
        left = differing_granules(src, raw_of(d, base, "dst.raw")) * GRAN
    if "j.json" not in os.listdir(state_dir):
        # no journal (its .json goes first: a kill inside the removal may leave the .map alone):
        # an active commit's pivot removed it (guests drained), or the job had ended
        assert complete_first or phase == "concluded", f"{kind}: no journal after the kill ({phase})"
        check_all(d)
        disk = base if kind == "active-commit" else top
        err = cc.model_error(raw_of(d, disk, "final.raw"), model, initial)
        assert err is None, f"{os.path.basename(disk)} (job over) misses guest writes: {err}"
        return {"phase": "pivoted" if complete_first else "over", "left": 0, "dirtied": 0,
                "copied": 0, "quiet": False, "resumed": False}

    p, s, cmd, nsock = start_daemon(d, top, state_dir)
    try:
        j = block_job(cmd)
        assert j and j["status"] == "paused" and j.get("vdisk-resumed") is True, j
        if kind == "active-commit":  # the guest writes as fast as a limited copy: no READY
            r = cmd("block-job-set-speed", device="j", speed=0)
            assert "return" in r, r
        guest = Guest(nsock, rng, history, gstate, pause=0.02, nblk=nblk) if not quiet else None
        if guest:
            guest.start()
        time.sleep(rng.uniform(0, 0.3))  # guest writes while the job is paused
        r = cmd("job-resume", id="j")
        assert "return" in r, r
        if kind == "active-commit":
            wait_for(lambda: (block_job(cmd) or {}).get("ready"), "READY")
            time.sleep(rng.uniform(0, 0.3))
        else:
            wait_concluded(cmd)
        copied = finish_trial(p, s, cmd, state_dir, guest, complete=kind == "active-commit")
    finally:
        reap(p, guest)
    dirtied = (len(history) - kill_writes) * GRAN if kind == "active-commit" else 0
    check_all(d)
    disk = base if kind == "active-commit" else top
    err = cc.model_error(raw_of(d, disk, "final.raw"), model, initial, settled_from=kill_writes)
    assert err is None, f"{os.path.basename(disk)} does not hold the guest's writes: {err}"
    if kind != "active-commit":
        assert os.path.realpath(backing_of(top)) == os.path.realpath(base), backing_of(top)
    if kind == "commit":
        assert raw_of(d, base, "base.raw") == mid_view, "base does not read what mid's chain did"
    check_copied(copied, left, dirtied)
    return {"phase": phase, "left": left, "dirtied": dirtied, "copied": copied, "quiet": quiet,
            "resumed": True}


KINDS = ["mirror", "stream", "commit", "active-commit"]


def trial(d, rng, kind):
    return trial_mirror(d, rng) if kind == "mirror" else trial_chain(d, rng, kind)


def main():
    trials = int(os.environ.get("TRIALS", sys.argv[1] if len(sys.argv) > 1 else "5"))
    seed = int(os.environ.get("SEED", random.SystemRandom().randrange(1 << 31)))
    kinds = os.environ.get("RESUME_JOBS", ",".join(KINDS)).split(",")
    assert set(kinds) <= set(KINDS), f"RESUME_JOBS: known jobs are {KINDS}"
    rng = random.Random(seed)
    tot = {k: {"n": 0, "left": 0, "dirtied": 0, "copied": 0, "worst": 0.0, "phases": {},
               "qn": 0, "qleft": 0, "qcopied": 0, "resumed": 0} for k in kinds}
    for t in range(trials):
        kind = kinds[t % len(kinds)]
        d = tempfile.mkdtemp(prefix="vdisk-resume-")
        try:
            res = trial(d, rng, kind)
        except BaseException as e:
            print(f"resume-campaign: trial {t} ({kind}) FAILED, seed {seed}, dir kept: {d}\n{e}")
            sys.exit(1)
        shutil.rmtree(d)
        k = tot[kind]
        print(f"resume-campaign: trial {t} {kind}: killed while {res['phase']}, "
              f"{'resumed' if res['resumed'] else 'no job to resume'}, left {res['left']}, "
              f"dirtied {res['dirtied']}, copied {res['copied']}", flush=True)
        k["n"] += 1
        k["resumed"] += res["resumed"]
        for f in ("left", "dirtied", "copied"):
            k[f] += res[f]
        k["phases"][res["phase"]] = k["phases"].get(res["phase"], 0) + 1
        if res["quiet"]:
            k["qn"] += 1
            k["qleft"] += res["left"]
            k["qcopied"] += res["copied"]
        base = res["left"] + res["dirtied"]
        k["worst"] = max(k["worst"], res["copied"] / base if base else 0.0)
        if (t + 1) % 25 == 0 and t + 1 < trials:
            print(f"resume-campaign: {t + 1} trials passed (seed {seed})", flush=True)
    mib = 1 << 20
    for kind, k in tot.items():
        if k["n"]:
            print(f"resume-campaign: {kind}: {k['n']} trials, killed while {k['phases']}, "
                  f"{k['resumed']} resumed after the restart; after "
                  f"the restarts the jobs copied {k['copied'] / mib:.1f} MiB for "
                  f"{k['left'] / mib:.1f} MiB left + {k['dirtied'] / mib:.1f} MiB dirtied (worst "
                  f"trial {k['worst']:.2f}x, bound 1.10x); in the {k['qn']} trials without guest "
                  f"writes after the restart {k['qcopied'] / mib:.1f} MiB copied for "
                  f"{k['qleft'] / mib:.1f} MiB left")
    print(f"resume-campaign: {trials} trials passed (seed {seed}); target == source in every "
          f"trial")


if __name__ == "__main__":
    main()
