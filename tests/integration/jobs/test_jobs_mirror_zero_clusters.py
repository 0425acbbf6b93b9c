"""blockdev-mirror sync=top writes the top's zero clusters into the target whatever the target's
backing: one it opened (another image), one its header names but blockdev-add left out
("backing": null - the target then reads that file once opened on its own, so its unallocated
clusters are not zero), none (raw). qemu-storage-daemon, given the same images and commands, is
the oracle: both targets must read the same (a raw target: the same top), and the top's zero
cluster must read zero."""
import pytest

from conftest import qemu_img, qemu_io
from qmp_client import fmt_node

MiB = 1 << 20


def images(d, variant):
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", MiB)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {MiB}", d / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
    qemu_io("-f", "qcow2", "-c", "write -z 0 64k", "-c", "write -P 0x22 64k 64k", d / "top.qcow2")
    if variant == "raw":
        qemu_img("create", "-q", "-f", "raw", d / "tgt", MiB)
        qemu_io("-f", "raw", "-c", f"write -P 0x44 0 {MiB}", d / "tgt")
        return fmt_node("raw", "tgt", d / "tgt")
    qemu_img("create", "-q", "-f", "qcow2", d / "other.qcow2", MiB)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x33 0 {MiB}", d / "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "other.qcow2", "-F", "qcow2", d / "tgt")
    node = fmt_node("qcow2", "tgt", d / "tgt")
    if variant == "backing-null":
        node["backing"] = None
    return node


def mirror_top(daemon, d, target):
    with daemon.client() as c:
        c.cmd("blockdev-add", **fmt_node("qcow2", "top", d / "top.qcow2"))
        c.cmd("blockdev-add", **target)
        c.cmd("blockdev-mirror", job_id="j", device="top", target="tgt", sync="top")
        c.get_event("BLOCK_JOB_READY")
        c.cmd("block-job-complete", device="j")
        c.get_event("BLOCK_JOB_COMPLETED")
        c.cmd("blockdev-del", node_name="tgt")


@pytest.mark.parametrize("variant", ["other-backing", "backing-null", "raw"])
def test_sync_top_writes_the_tops_zero_clusters_as_qemu_does(vd, qsd, tmp, variant):
    fmt = "raw" if variant == "raw" else "qcow2"
    mine, theirs = tmp / "vdisk", tmp / "qemu"
    mirror_top(vd, mine, images(mine, variant))
    mirror_top(qsd, theirs, images(theirs, variant))
    for d in (mine, theirs):
        qemu_io("-f", fmt, "-c", "read -P 0 0 64k", "-c", "read -P 0x22 64k 64k", d / "tgt")
    if variant != "raw":
        p = qemu_img("compare", "-f", fmt, "-F", fmt, mine / "tgt", theirs / "tgt", check=False)
        assert p.returncode == 0, p.stdout + p.stderr
    else:
        # beyond the top's clusters vdisk fills a layerless target with base's data too (it
        # cannot share base: mirror.c copies it every byte), where QEMU leaves its own bytes
        qemu_io("-f", "raw", "-c", "read -P 0x11 128k 896k", mine / "tgt")
        qemu_io("-f", "raw", "-c", "read -P 0x44 128k 896k", theirs / "tgt")
