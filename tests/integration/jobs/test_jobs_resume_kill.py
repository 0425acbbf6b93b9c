"""Resumable jobs (docs/resumable.md) beyond test_jobs_resume.py: a non-active commit killed
(kill -9) while a submitted chunk still waits in its worker before the copy starts resumes every
range (the journal's progress mark once passed such a chunk: data loss, fixed in 66d3849), and
the restart's log says truthfully what each journal holds (a stream's empty map is no problem)."""
import os
import re
import time

import pytest

from conftest import qemu_img, qemu_io
from test_jobs_resume import chain3, daemon, job, stopped_chain_job, wait_status


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


@pytest.mark.parametrize("case", ["stream", "commit-empty-map", "commit-damaged-map"])
def test_restart_log_says_what_the_journal_holds(tmp, case):
    """A stream's map stays empty by design (the top's allocation is its progress): its restart
    logs no map problem, and says it skips what the top holds. A commit's map that is empty (no
    write reached it) or damaged is logged as such, every segment then counting as marked."""
    base, mid, top, state = stopped_chain_job(tmp, "stream" if case == "stream" else "commit")
    if case == "commit-empty-map":
        (state / "j.map").write_bytes(b"")
    elif case == "commit-damaged-map":
        (state / "j.map").write_bytes(b"\x5a" * 8192)
    d = daemon(tmp, top, state, "-v")
    try:
        with d.client() as c:
            j = job(c)
            assert j["status"] == "paused" and j["vdisk-resumed"] is True, j
        out = d.output()
    finally:
        d.stop_checked()
    if case == "stream":
        assert "segment map" not in out, out
        assert "job 'j' resumed from its journal, PAUSED (a stream: it skips what the top " \
               "already holds)" in out, out
    else:
        why = "none was written" if case == "commit-empty-map" else "damaged, or another job's"
        assert f"j.json': no valid segment map ({why}), every segment counts as marked" in out, \
            out
        assert f"job 'j' resumed from its journal, PAUSED ({16 << 20} bytes to compare)" in out, out
