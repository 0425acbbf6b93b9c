"""Resumable jobs (docs/resumable.md) beyond test_jobs_resume.py: a non-active commit killed
(kill -9) while a submitted chunk still waits in its worker before the copy starts resumes every
range (the journal's progress mark once passed such a chunk: data loss, fixed in 66d3849)."""
import os
import re
import time

from conftest import qemu_img, qemu_io
from test_jobs_resume import chain3, daemon, job, wait_status


def wait_for(pred, what, limit=60):
    for _ in range(int(limit / 0.02)):
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_commit_killed_while_a_chunk_waits_for_its_worker_resumes_every_range(tmp, monkeypatch):
    """base (7s in 0..8M) <- mid (9s in 4M..12M) <- top: commit of mid into base, 4 workers, 1 MiB
    chunks. VDISK_TEST_COPY_PACE_MS (a test hook in jobs/copy.c, as the guest-priority pacing
    does) starts the chunks at 4M, 5M, 6M, 7M... 1.5 s apart, so when the journal first clears
    (~1 s after the start, at the reap of 5M) the chunks at 6M..8M are submitted but not begun.
    kill -9 right after that clear reaches the map; restart, resume: base must read what mid's
    chain read, every byte. With the sweep's old tick (the submitted offset) the clear covered
    6M..9M and the resumed job never copied them ('Pattern verification failed' at 4M..12M)."""
    base, mid, top = chain3(tmp)
    state = tmp / "state"
    state.mkdir()
    monkeypatch.setenv("VDISK_COPY_WORKERS", "4")
    monkeypatch.setenv("VDISK_COPY_UNIT", str(1 << 20))
    monkeypatch.setenv("VDISK_TEST_COPY_PACE_MS", "1500")
    d = daemon(tmp, top, state)
    try:
        with d.client() as c:
            c.cmd("block-commit", job_id="j", device="top", top=str(mid), base=str(base),
                  auto_dismiss=False)
            # The map file stays empty until its first write: here the first clear (no guest).
            wait_for(lambda: (state / "j.map").stat().st_size > 0, "the journal's first clear")
            d.proc.kill()  # SIGKILL
            d.proc.wait(timeout=30)
    finally:
        d.kill()
    # the kill landed while the job was copying: base does not hold all of mid yet
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", base, mid, check=False)
    assert p.returncode == 1, p.stdout
    assert sorted(os.listdir(state)) == ["j.json", "j.map"]
    monkeypatch.delenv("VDISK_TEST_COPY_PACE_MS")
    d = daemon(tmp, top, state, "-v")
    try:
        with d.client() as c:
            j = job(c)
            assert j["status"] == "paused" and j["vdisk-resumed"] is True, j
            c.cmd("job-resume", id="j")
            j = wait_status(c, "concluded")
            assert "error" not in j, j
            c.cmd("job-dismiss", id="j")
            assert os.listdir(state) == []
        # the journal had cleared something (its first clear is what this test is about)
        m = re.search(r"job 'j' resumed from its journal, PAUSED \((\d+) bytes to compare\)",
                      d.output())
        assert m and int(m.group(1)) < 16 << 20, d.output()
    finally:
        d.stop_checked()
    qemu_io("-f", "qcow2", "-c", "read -P 7 0 4M", "-c", "read -P 9 4M 8M",
            "-c", "read -P 0 12M 4M", base)
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", base, mid, check=False)
    assert p.returncode == 0, p.stdout
    qemu_io("-f", "qcow2", "-c", "read -P 7 0 4M", "-c", "read -P 9 4M 8M",
            "-c", "read -P 0 12M 4M", top)
    for img in (base, mid, top):
        qemu_img("check", "-f", "qcow2", img)
