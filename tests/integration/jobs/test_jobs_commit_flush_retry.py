"""An active commit whose base keeps failing its flush does not spin (5f97b36: the retry waits
10 ms doubling to 1 s): base is a qcow2 served by nbdkit's sh plugin, whose flush fails with EIO
while a trigger file exists and logs every attempt with its time. Before READY (on-error=ignore)
and in the ready loop (a guest flush asks for base's), attempts over a few seconds stay few and
spread out; once the trigger goes the job gets READY / completes and base holds the disk."""
import json
import os
import subprocess
import time

from conftest import qemu_img, qemu_io, wait_unix_listening
from qmp_client import file_node, start_vdiskd
from test_jobs_resume import wait_status

SIZE = 8 << 20

# $1 method; pread/pwrite: $3 count, $4 offset (nbdkit-sh-plugin(3)). The qcow2 image is
# preallocated: nbdkit's export keeps its size, so the commit must not grow the file.
PLUGIN = r"""#!/bin/sh
f=@IMG@; t=@TRIGGER@; log=@LOG@
case "$1" in
  get_size) stat -L -c %s "$f" ;;
  pread) dd if="$f" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  pwrite) dd of="$f" seek="$4" conv=notrunc oflag=seek_bytes status=none ;;
  can_write|can_flush) exit 0 ;;
  can_fua) echo none ;;
  flush)
    date +%s.%N >> "$log"
    if [ -e "$t" ]; then echo "EIO flush fails (test trigger)" >&2; exit 1; fi
    sync "$f" ;;
  *) exit 2 ;;
esac
"""


def attempts(log):
    return [float(x) for x in log.read_text().split()] if log.exists() else []


def assert_no_spin(log, since, what):
    """The flushes logged since `since` (at least 2 s of failures): more than one (it retries),
    few, and the gaps between them grow past 100 ms (a tight loop syncs every few ms)."""
    t = [x for x in attempts(log) if x >= since]
    assert len(t) >= 3, f"{what}: {len(t)} flush attempts"
    assert len(t) <= 15, f"{what}: {len(t)} flush attempts in {t[-1] - t[0]:.1f} s: it spins"
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert max(gaps[-2:]) >= 0.1, f"{what}: gaps {gaps}"


def test_active_commit_with_a_failing_base_flush_backs_off_and_recovers(tmp):
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", base, SIZE)
    qemu_io("-f", "qcow2", "-c", "write -P 7 0 4M", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", "write -P 9 2M 4M", top)
    trigger, log, script = tmp / "fail-flush", tmp / "flushes.log", tmp / "plugin.sh"
    script.write_text(PLUGIN.replace("@IMG@", str(base)).replace("@TRIGGER@", str(trigger))
                      .replace("@LOG@", str(log)))
    os.chmod(script, 0o755)
    kit = tmp / "kit.sock"
    nk = subprocess.Popen(["nbdkit", "-f", "-U", str(kit), "sh", str(script)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = None
    try:
        wait_unix_listening(str(kit), nk)
        nbd = tmp / "nbd.sock"
        d = start_vdiskd(tmp, "--blockdev", json.dumps({
            "driver": "qcow2", "node-name": "base",
            "file": {"driver": "nbd", "server": {"type": "unix", "path": str(kit)},
                     "export": ""}}),
            "--blockdev", json.dumps({"driver": "qcow2", "node-name": "top",
                                      "file": file_node(top), "backing": "base"}),
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=e0,node-name=top,name=disk,writable=on")
        uri = f"nbd+unix:///disk?socket={nbd}"
        with d.client() as c:
            # 1. before READY, on-error=ignore: the flush that would make base durable fails
            trigger.write_text("")
            t0 = time.time()
            c.cmd("block-commit", job_id="j", device="top", on_error="ignore",
                  auto_dismiss=False)
            time.sleep(3)
            j = wait_status(c, "running", limit=5)
            assert not j["ready"], j
            assert_no_spin(log, t0, "before READY")
            trigger.unlink()
            wait_status(c, "ready", limit=30)
            # 2. ready: a guest write and flush; base's flush in the ready loop fails
            trigger.write_text("")
            t1 = time.time()
            qemu_io("-f", "raw", "-c", "write -P 0x44 1M 64k", "-c", "flush", uri, check=False)
            time.sleep(3)
            assert_no_spin(log, t1, "ready")
            trigger.unlink()
            n = len(attempts(log))
            for _ in range(250):  # the next try succeeds: at most 1 s away (5 s bound)
                if len(attempts(log)) > n:
                    break
                time.sleep(0.02)
            c.cmd("block-job-complete", device="j")
            j = wait_status(c, "concluded", limit=30)
            assert "error" not in j, j
            c.cmd("job-dismiss", id="j")
        d.stop_checked()
        d = None
    finally:
        if d:
            d.kill()
        nk.terminate()
        nk.wait(timeout=30)
    qemu_img("check", "-f", "qcow2", base)
    qemu_io("-f", "qcow2", "-c", "read -P 7 0 1M", "-c", "read -P 0x44 1M 64k",
            "-c", f"read -P 7 {(1 << 20) + (64 << 10)} {(1 << 20) - (64 << 10)}",
            "-c", "read -P 9 2M 4M", "-c", "read -P 0 6M 2M", base)
