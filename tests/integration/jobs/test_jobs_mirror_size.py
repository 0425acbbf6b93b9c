"""A mirror onto a target of another size fails as qemu-storage-daemon's does: the command starts
the job, which concludes at once with "Source and target image have different sizes"; the guest's
disk keeps its size and content (no pivot can grow or shrink it)."""
import json
import subprocess

import pytest

from conftest import qemu_img, qemu_io
from qmp_client import start_qsd, start_vdiskd


MiB = 1 << 20
ERR = "Source and target image have different sizes"


def node(name, path):
    return {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": str(path)}}


def finished_error(q, job):
    ev = q.get_event("BLOCK_JOB_COMPLETED")
    assert ev["data"]["device"] == job and ev["data"]["type"] == "mirror", ev
    return ev["data"].get("error")


def images(d, target_size):
    d.mkdir()
    src, tgt = d / "src.qcow2", d / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, 4 * MiB)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x5a 0 {4 * MiB}", src)
    qemu_img("create", "-q", "-f", "qcow2", tgt, target_size)
    return src, tgt


def qsd_error(tmp, target_size, command):
    src, tgt = images(tmp / "qsd", target_size)
    d = start_qsd(tmp / "qsd")
    try:
        with d.client() as q:
            q.cmd("blockdev-add", **node("src", src))
            if command == "blockdev-mirror":
                q.cmd("blockdev-add", **node("tgt", tgt))
                q.cmd(command, job_id="j", device="src", target="tgt", sync="full")
            else:
                q.cmd(command, job_id="j", device="src", target=str(tgt), sync="full",
                      mode="existing", format="qcow2")
            return finished_error(q, "j")
    finally:
        d.kill()


@pytest.mark.parametrize("command", ["blockdev-mirror", "drive-mirror"])
@pytest.mark.parametrize("target_size", [8 * MiB, 2 * MiB])
def test_mirror_to_other_size_fails_like_qsd(tmp, command, target_size):
    expected = qsd_error(tmp, target_size, command)
    assert expected == ERR  # the oracle's answer (so this test notices if QEMU changes)
    src, tgt = images(tmp / "vd", target_size)
    sock = str(tmp / "vd" / "nbd.sock")
    d = start_vdiskd(tmp / "vd", "--blockdev", json.dumps(node("src", src)),
                     "--nbd-server", f"addr.type=unix,addr.path={sock}",
                     "--export", "type=nbd,id=e0,node-name=src,name=disk,writable=on")
    uri = f"nbd+unix:///disk?socket={sock}"
    try:
        with d.client() as q:
            if command == "blockdev-mirror":
                q.cmd("blockdev-add", **node("tgt", tgt))
                q.cmd(command, job_id="j", device="src", target="tgt", sync="full")
            else:
                q.cmd(command, job_id="j", device="src", target=str(tgt), sync="full",
                      mode="existing", format="qcow2")
            assert finished_error(q, "j") == expected
            assert q.cmd("query-block-jobs") == []
            size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                                  check=True, timeout=60).stdout.strip()
            assert int(size) == 4 * MiB
            qemu_io("-f", "raw", "-c", f"read -P 0x5a 0 {4 * MiB}", uri)
            assert [e["id"] for e in q.cmd("query-block-exports")] == ["e0"]
            assert q.cmd("query-block-exports")[0]["node-name"] == "src"
        d.stop_checked()
    finally:
        d.kill()
    info = json.loads(qemu_img("info", "--output=json", tgt).stdout)
    assert info["virtual-size"] == target_size
