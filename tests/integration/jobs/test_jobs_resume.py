"""Resumable live copies (vdiskd --state-dir, docs/resumable.md): a copy survives a stop or a
kill -9 of vdiskd, comes back PAUSED under its id, and job-resume finishes it; cancel drops its
journal; a journal whose images are gone is kept and logged. A few trials of the kill -9
campaign (scripts/resume-campaign.py; `make resume-campaign TRIALS=N` runs many)."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import BUILD, ROOT, qemu_img, qemu_io, vdisk
from qmp_client import fmt_node, start_vdiskd

SIZE = 16 << 20


def chain(tmp):
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 7 0 {SIZE // 2}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", f"write -P 9 {SIZE // 4} {SIZE // 2}", top)
    return top


def daemon(tmp, top, state, *extra):
    return start_vdiskd(tmp, "--state-dir", str(state), "--blockdev",
                        json.dumps(fmt_node("qcow2", "top", top)), *extra,
                        "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
                        "--export", "type=nbd,id=e0,node-name=top,name=disk,writable=on")


def guest_write(tmp, pattern, off, length):
    qemu_io("-f", "raw", "-c", f"write -P {pattern} {off} {length}",
            f"nbd+unix:///disk?socket={tmp / 'nbd.sock'}")


def job(c, job_id="j"):
    return next((j for j in c.cmd("query-block-jobs") if j["device"] == job_id), None)


def wait_status(c, status, limit=60):
    for _ in range(limit * 50):
        j = job(c)
        if j and (j["status"] == status or (status == "ready" and j["ready"])):
            return j
        time.sleep(0.02)
    raise AssertionError(f"job never {status}: {job(c)}")


def start_slow_copy(tmp, c, blockdev):
    """A copy held back by a speed limit (1 MiB/s: it is still copying when vdiskd stops)."""
    if blockdev:
        c.cmd("blockdev-mirror", job_id="j", device="top", target="tgt", sync="full",
              speed=1 << 20)
    else:
        c.cmd("drive-mirror", job_id="j", device="top", target=str(tmp / "copy.qcow2"),
              format="qcow2", sync="full", speed=1 << 20)


@pytest.mark.parametrize("blockdev", [False, True], ids=["drive-mirror", "blockdev-mirror"])
def test_stopped_copy_comes_back_paused_and_finishes(tmp, blockdev):
    top, state, copy = chain(tmp), tmp / "state", tmp / "copy.qcow2"
    state.mkdir()
    extra = []
    if blockdev:
        qemu_img("create", "-q", "-f", "qcow2", copy, SIZE)
        extra = ["--blockdev", json.dumps(fmt_node("qcow2", "tgt", copy))]
    d = daemon(tmp, top, state, *extra)
    try:
        with d.client() as c:
            start_slow_copy(tmp, c, blockdev)
            guest_write(tmp, 0x31, 1 << 20, 64 << 10)
            assert sorted(os.listdir(state)) == ["j.json", "j.map"]
    finally:
        d.stop_checked()  # SIGTERM: the journal stays
    assert sorted(os.listdir(state)) == ["j.json", "j.map"]
    d = daemon(tmp, top, state, *extra)
    try:
        with d.client() as c:
            j = job(c)
            assert j["status"] == "paused" and j["vdisk-resumed"] is True, j
            # the export serves the copy's filter: this write is tracked although the job waits
            exp = c.cmd("query-block-exports")
            assert exp[0]["node-name"] == "#mirror-top-j", exp
            guest_write(tmp, 0x42, 5 << 20, 128 << 10)
            c.cmd("block-job-set-speed", device="j", speed=0)
            c.cmd("job-resume", id="j")
            wait_status(c, "ready")
            c.cmd("block-job-complete", device="j")
            c.get_event("BLOCK_JOB_COMPLETED")
            assert os.listdir(state) == []
            guest_write(tmp, 0x53, 9 << 20, 4096)  # now on the copy
    finally:
        d.stop_checked()
    # the copy holds the guest's disk: qemu-io reads back every write, top lacks the last one
    qemu_io("-f", "qcow2", "-c", "read -P 0x31 1M 64k", "-c", "read -P 0x42 5M 128k",
            "-c", "read -P 0x53 9M 4k", "-c", f"read -P 9 {SIZE // 4} 64k", copy)
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", top, copy, check=False)
    assert p.returncode == 1 and "9437184" in p.stdout, p.stdout


def stopped_while_copying(tmp, top, start):
    """vdiskd --state-dir serving top; start(c) starts a slow job; vdiskd stops (SIGTERM) while
    it copies. Returns the state dir, holding the job's journal."""
    state = tmp / "state"
    state.mkdir()
    d = daemon(tmp, top, state)
    try:
        with d.client() as c:
            start(c)
    finally:
        d.stop_checked()
    return state


def stopped_copy(tmp):
    """A drive-mirror still copying when vdiskd stopped (SIGTERM): (top, state dir)."""
    top = chain(tmp)
    return top, stopped_while_copying(tmp, top, lambda c: start_slow_copy(tmp, c, False))


def test_cancel_of_a_resumed_copy_drops_its_journal(tmp):
    top, state = stopped_copy(tmp)
    d = daemon(tmp, top, state)
    try:
        with d.client() as c:
            assert job(c)["status"] == "paused"
            c.cmd("block-job-cancel", device="j", force=True)
            c.get_event("BLOCK_JOB_CANCELLED")
            assert os.listdir(state) == []
            exp = c.cmd("query-block-exports")
            assert exp[0]["node-name"] == "top", exp  # back on the source
    finally:
        d.stop_checked()
    d = daemon(tmp, top, state)  # and nothing comes back
    try:
        with d.client() as c:
            assert c.cmd("query-block-jobs") == []
    finally:
        d.stop_checked()


def test_journal_whose_target_is_gone_is_kept_and_logged(tmp):
    top, state = stopped_copy(tmp)
    os.unlink(tmp / "copy.qcow2")
    d = daemon(tmp, top, state, "-v")
    try:
        with d.client() as c:
            assert c.cmd("query-block-jobs") == []
            assert c.cmd("query-block-exports")[0]["node-name"] == "top"
        guest_write(tmp, 0x61, 0, 4096)
        assert "j.json' not resumed (kept)" in d.output(), d.output()
        assert sorted(os.listdir(state)) == ["j.json", "j.map"]
    finally:
        d.stop_checked()


@pytest.mark.parametrize("name", ["j", "top", "e0"], ids=["job-id", "node", "export-id"])
def test_vdisk_blockjob_resume_continues_a_copy_offered_back(tmp, name):
    """`vdisk blockjob DISK --resume` (block-job-resume) continues the copy vdiskd offered back
    paused after a restart; on a job that runs it fails and says so; the copy then finishes and
    reads like the disk. DISK is the copy's own job id ("j", not the disk's), or the disk: its node
    or its export's id, which name the job by the node query-block-jobs reports (vdisk-node)."""
    top, state = stopped_copy(tmp)
    d = daemon(tmp, top, state)
    try:
        with d.client() as c:
            assert job(c)["status"] == "paused"
            assert job(c)["vdisk-node"] == "top"
            c.cmd("block-job-set-speed", device="j", speed=0)
            p = vdisk("blockjob", name, "--raw", "--socket", d.qmp_path)
            assert p.stdout.startswith(" type=Copy\n"), p.stdout
            p = vdisk("blockjob", name, "--resume", "--socket", d.qmp_path)
            assert p.stdout == "\n", p.stdout
            wait_status(c, "ready")
            p = vdisk("blockjob", name, "--resume", "--socket", d.qmp_path, check=False)
            assert p.returncode == 1 and f"failed to resume job for disk {name}" in p.stderr, \
                p.stderr
            p = vdisk("blockjob", name, "--resume", "--info", "--socket", d.qmp_path,
                      check=False)
            assert p.returncode == 1 and "mutually exclusive" in p.stderr, p.stderr
            # another disk's name finds nothing
            p = vdisk("blockjob", "nosuchdisk", "--resume", "--socket", d.qmp_path, check=False)
            assert p.returncode == 1 and "No current block job for nosuchdisk" in p.stderr, \
                p.stderr
            c.cmd("block-job-complete", device="j")
            c.get_event("BLOCK_JOB_COMPLETED")
            assert os.listdir(state) == []
    finally:
        d.stop_checked()
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", top, tmp / "copy.qcow2", check=False)
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("arg", [None, ""], ids=["default", "turned-off"])
def test_state_dir_defaults_to_systemds_state_directory(tmp, monkeypatch, arg):
    """Without --state-dir vdiskd journals in $STATE_DIRECTORY (systemd sets it from the unit's
    StateDirectory=; the first of a list); --state-dir '' turns journals off."""
    state = tmp / "state"
    state.mkdir()
    monkeypatch.setenv("STATE_DIRECTORY", f"{state}:{tmp / 'other'}")
    extra = [] if arg is None else ["--state-dir", arg]
    d = start_vdiskd(tmp, *extra, "--blockdev", json.dumps(fmt_node("qcow2", "top", chain(tmp))))
    try:
        with d.client() as c:
            start_slow_copy(tmp, c, False)
            want = ["j.json", "j.map"] if arg is None else []
            assert sorted(os.listdir(state)) == want
            c.cmd("block-job-cancel", device="j", force=True)
            c.get_event("BLOCK_JOB_CANCELLED")
    finally:
        d.stop_checked()
    assert not (tmp / "other").exists()


def test_resume_campaign_few_trials():
    """One trial of each kind: mirror, stream, commit, active commit (kill -9, restart, resume)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "resume-campaign.py"), "4"],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "VDISK_BUILD": BUILD})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 trials passed" in p.stdout and "target == source in every trial" in p.stdout, \
        p.stdout


def chain3(tmp):
    """base (7s in the first half) <- mid (9s in the middle half) <- top (empty)."""
    base, mid, top = tmp / "base.qcow2", tmp / "mid.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 7 0 {SIZE // 2}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qemu_io("-f", "qcow2", "-c", f"write -P 9 {SIZE // 4} {SIZE // 2}", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    return base, mid, top


def stopped_chain_job(tmp, kind, before_stop=lambda c: None):
    """A stream, commit of mid or active commit (kind) over chain3 at 1 MiB/s, still copying
    when vdiskd stopped (SIGTERM) after before_stop(c): (base, mid, top, state dir)."""
    base, mid, top = chain3(tmp)

    def start(c):
        common = {"job_id": "j", "device": "top", "base": str(base), "speed": 1 << 20,
                  "auto_dismiss": False}
        if kind == "stream":
            c.cmd("block-stream", **common)
        elif kind == "commit":
            c.cmd("block-commit", top=str(mid), **common)
        else:
            c.cmd("block-commit", **common)
        before_stop(c)
    return base, mid, top, stopped_while_copying(tmp, top, start)


@pytest.mark.parametrize("kind", ["stream", "commit", "active-commit"])
def test_stopped_stream_or_commit_comes_back_paused_and_finishes(tmp, kind):
    """Stopped (SIGTERM) while copying at 1 MiB/s: after the restart the job is PAUSED and
    resumed-flagged, a guest writes over NBD (qemu-io) while it is paused and after job-resume,
    and the job finishes with the chain's content and the guest's writes where they belong."""
    def before_stop(c):
        time.sleep(1.5)
        assert job(c)["status"] == "running"
        guest_write(tmp, 0x51, 1 << 20, 64 << 10)  # in top

    base, mid, top, state = stopped_chain_job(tmp, kind, before_stop)
    assert sorted(os.listdir(state)) == ["j.json", "j.map"]
    d = daemon(tmp, top, state)
    try:
        with d.client() as c:
            j = job(c)
            assert j["status"] == "paused" and j["vdisk-resumed"] is True, j
            guest_write(tmp, 0x52, 5 << 20, 64 << 10)  # while paused
            c.cmd("block-job-set-speed", device="j", speed=0)
            c.cmd("job-resume", id="j")
            guest_write(tmp, 0x53, 13 << 20, 4096)  # while running (or ready)
            if kind == "active-commit":
                wait_status(c, "ready")
                c.cmd("block-job-complete", device="j")
            j = wait_status(c, "concluded")
            assert "error" not in j, j
            c.cmd("job-dismiss", id="j")
            assert os.listdir(state) == []
    finally:
        d.stop_checked()
    disk = base if kind == "active-commit" else top
    for img in (base, mid, top):
        qemu_img("check", "-f", "qcow2", img)
    qemu_io("-f", "qcow2", "-c", "read -P 7 0 1M", "-c", "read -P 0x51 1M 64k",
            "-c", "read -P 7 2M 2M", "-c", "read -P 9 4M 1M", "-c", "read -P 0x52 5M 64k",
            "-c", f"read -P 9 {(5 << 20) + (64 << 10)} {(7 << 20) - (64 << 10)}",
            "-c", "read -P 0x53 13M 4k", "-c", "read -P 0 14M 2M", disk)
    if kind != "active-commit":
        info = json.loads(qemu_img("info", "--output=json", top).stdout)
        assert os.path.realpath(info["full-backing-filename"]) == str(base), info
    if kind == "commit":  # base took mid's data, not the guest's
        qemu_io("-f", "qcow2", "-c", "read -P 7 0 4M", "-c", "read -P 9 4M 8M",
                "-c", "read -P 0 12M 4M", base)


def test_commit_journal_over_another_chain_is_kept_and_logged(tmp):
    """The images changed while vdiskd was down (top rebased past mid): the commit of mid is not
    brought back over a chain that no longer holds it; its journal is kept and logged."""
    base, mid, top, state = stopped_chain_job(tmp, "commit")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    d = daemon(tmp, top, state, "-v")
    try:
        with d.client() as c:
            assert c.cmd("query-block-jobs") == []
        assert "j.json' not resumed (kept)" in d.output(), d.output()
        assert sorted(os.listdir(state)) == ["j.json", "j.map"]
    finally:
        d.stop_checked()
