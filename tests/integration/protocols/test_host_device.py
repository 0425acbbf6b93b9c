"""host_device: block devices by path, as qemu-img opens them (a /dev path picks host_device,
`driver=host_device` names it, `driver=file` refuses a device). Each test makes its own loop
device with losetup over a file in tmp and removes it; the tests need root (CI runs as root)."""
import json
import os
import subprocess

import pytest

from conftest import qemu_img, qemu_io, run, vdisk
from qmp_client import QMPError

MiB = 1 << 20


@pytest.fixture
def loopdev(tmp):
    assert os.getuid() == 0, "host_device tests create a loop device: run them as root"
    backing = tmp / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    dev = run(["losetup", "-f", "--show", str(backing)]).stdout.strip()
    assert dev.startswith("/dev/loop"), dev
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _same(args, strip=None):
    pv, pq = vdisk(*args, check=False), qemu_img(*args, check=False)
    assert pv.returncode == pq.returncode, (pv.stderr, pq.stderr)
    assert pv.stdout == pq.stdout
    assert pv.stderr.replace("vdisk:", "qemu-img:") == pq.stderr
    return pv


@pytest.mark.parametrize("how", ["-f raw", "--image-opts"])
@pytest.mark.parametrize("out", ["human", "json"])
def test_info_of_a_block_device_matches_qemu_img(loopdev, how, out):
    name = f"driver=host_device,filename={loopdev}" if how == "--image-opts" else loopdev
    p = _same(["info", *how.split(), f"--output={out}", name])
    if out == "json":
        info = json.loads(p.stdout)
        assert info["virtual-size"] == 8 * MiB
        assert info["format"] == ("host_device" if how == "--image-opts" else "raw")


def test_drivers_refuse_the_wrong_kind_of_file_as_qemu_img(loopdev, tmp):
    _same(["info", f'json:{{"driver":"raw","file":{{"driver":"file","filename":"{loopdev}"}}}}'])
    (tmp / "plain.raw").write_bytes(bytes(MiB))
    _same(["info", "--image-opts", f"driver=host_device,filename={tmp / 'plain.raw'}"])


def test_qcow2_on_a_block_device_both_ways(loopdev, tmp):
    """vdisk creates qcow2 on the device, qemu-io writes, vdisk reads and converts it back out;
    then raw on the device written by vdisk and read by qemu-io."""
    vdisk("create", "-q", "-f", "qcow2", loopdev, "4M")
    assert json.loads(qemu_img("info", "--output=json", loopdev).stdout)["format"] == "qcow2"
    qemu_io("-f", "qcow2", "-c", "write -P 3 0 64k", "-c", "write -P 4 3M 4k", loopdev)
    vdisk("io", "-f", "qcow2", "-c", "read -P 3 0 64k", "-c", "read -P 4 3M 4k",
          "-c", "read -P 0 1M 64k", loopdev)
    vdisk("convert", "-f", "qcow2", "-O", "raw", loopdev, tmp / "out.raw")
    qemu_img("compare", "-f", "qcow2", "-F", "raw", loopdev, tmp / "out.raw")
    assert qemu_img("check", "-f", "qcow2", loopdev).returncode == 0
    src = os.urandom(2 * MiB)
    (tmp / "src.raw").write_bytes(src)
    vdisk("convert", "-n", "-f", "raw", "-O", "raw", tmp / "src.raw", loopdev)
    with open(loopdev, "rb") as f:
        assert f.read(2 * MiB) == src
    vdisk("io", "-f", "raw", "-t", "none", "-c", "write -P 9 4M 1M", loopdev)
    qemu_io("-f", "raw", "-c", "read -P 9 4M 1M", loopdev)


def test_vdiskd_blockdev_add_host_device_like_qsd(loopdev, tmp, vd, qsd):
    with open(loopdev, "r+b") as f:
        f.write(b"\x42" * MiB)
    replies = []
    for d in (vd, qsd):
        with d.client() as c:
            # vdiskd and QSD both lock the device: one at a time
            c.cmd("blockdev-add", driver="host_device", filename=loopdev,
                  **{"node-name": "h0", "read-only": True})
            c.cmd("blockdev-add", driver="raw", file="h0", **{"node-name": "r0",
                                                              "read-only": True})
            nodes = {n["node-name"]: n for n in c.cmd("query-named-block-nodes", flat=True)}
            replies.append((nodes["h0"]["drv"], nodes["h0"]["image"]["virtual-size"],
                            nodes["r0"]["image"]["virtual-size"]))
            try:
                c.cmd("blockdev-add", driver="file", filename=loopdev, **{"node-name": "f0"})
                replies.append("accepted")
            except QMPError as e:
                replies.append(str(e))
            c.cmd("blockdev-del", **{"node-name": "r0"})
            c.cmd("blockdev-del", **{"node-name": "h0"})
    assert replies[0] == replies[2] == ("host_device", 8 * MiB, 8 * MiB)
    assert "'file' driver requires" in replies[1] and replies[1] == replies[3]
