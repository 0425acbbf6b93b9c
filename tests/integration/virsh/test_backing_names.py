"""Backing names stay as the user wrote them (issue 9, item 6).

The daemon opens the chain by absolute paths (the README's usage); commit, pull, snapshot-create and
a fresh --shallow copy target must still record relative names (relative to the image whose header
names them) unless --absolute-backing asks otherwise, and a header that names its backing by an
absolute path keeps doing so. qemu-img info reads the names; qemu-img compare, run from another
directory, checks that every chain still resolves to the guest's data. --absolute-backing is
checked against qemu-storage-daemon too (QMP's mode=absolute-paths / backing-file).
"""
import json
import os

import pytest

from conftest import qemu_img
from test_virsh_cli import Server, make_chain, same_content, backing_of, kind  # noqa: F401

MiB = 1 << 20


def compare_elsewhere(img, ref):
    """qemu-img compare from / : relative names must resolve against the image's directory."""
    cwd = os.getcwd()
    os.chdir("/")
    try:
        same_content(img, ref)
    finally:
        os.chdir(cwd)


@pytest.fixture
def served(tmp):
    (base, mid, top), ref = make_chain(tmp, layers=3)
    with Server("vdiskd", tmp, top) as srv:
        yield base, mid, top, ref, srv


def test_commit_pull_snapshot_copy_record_relative_names(tmp, served):
    base, mid, top, ref, srv = served
    srv.run("blockcommit", "exp0", "--top", "exp0[1]", "--base", "exp0[2]", "--wait")
    srv.run("snapshot-create", "exp0", tmp / "snap.qcow2")
    srv.run("blockpull", "exp0", "--base", "exp0[2]", "--wait")  # snap <- base now
    srv.run("blockcopy", "exp0", tmp / "copy.qcow2", "--shallow", "--finish")
    srv.stop()
    assert backing_of(top) == "base.qcow2"            # commit rewrote top's header
    assert backing_of(tmp / "snap.qcow2") == "base.qcow2"   # snapshot, then pull onto base
    assert backing_of(tmp / "copy.qcow2") == "base.qcow2"   # fresh shallow target
    for img in (top, tmp / "snap.qcow2", tmp / "copy.qcow2"):
        compare_elsewhere(img, ref)


def test_relative_names_across_directories(tmp):
    """Images in different directories: the recorded name climbs out of the overlay's directory."""
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    (base, top), ref = make_chain(tmp, layers=2)
    os.rename(base, tmp / "a" / "base.qcow2")
    os.rename(top, tmp / "b" / "top.qcow2")
    base, top = tmp / "a" / "base.qcow2", tmp / "b" / "top.qcow2"
    qemu_img("rebase", "-u", "-b", "../a/base.qcow2", "-F", "qcow2", top)
    with Server("vdiskd", tmp, top) as srv:
        srv.run("snapshot-create", "exp0", tmp / "b" / "snap.qcow2")
        srv.run("blockcopy", "exp0", tmp / "c.qcow2", "--shallow", "--finish")
    assert backing_of(tmp / "b" / "snap.qcow2") == "top.qcow2"
    assert backing_of(tmp / "c.qcow2") == "b/top.qcow2"
    compare_elsewhere(tmp / "b" / "snap.qcow2", ref)
    compare_elsewhere(tmp / "c.qcow2", ref)


def test_absolute_header_stays_absolute(tmp):
    (base, mid, top), ref = make_chain(tmp, layers=3)
    qemu_img("rebase", "-u", "-b", str(mid), "-F", "qcow2", top)
    with Server("vdiskd", tmp, top) as srv:
        srv.run("blockcommit", "exp0", "--top", "exp0[1]", "--shallow", "--wait")
    assert backing_of(top) == str(base)
    compare_elsewhere(top, ref)


def test_absolute_backing_option(kind, tmp):  # noqa: F811
    """--absolute-backing on every command, on vdiskd and on qemu-storage-daemon alike."""
    (base, mid, top), ref = make_chain(tmp, layers=3)
    with Server(kind, tmp, top) as srv:
        srv.require("block-commit", "block-stream", "drive-mirror", "blockdev-snapshot-sync")
        srv.run("blockcommit", "exp0", "--top", "exp0[1]", "--base", "exp0[2]", "--wait",
                "--absolute-backing")
        srv.run("snapshot-create", "exp0", tmp / "snap.qcow2", "--absolute-backing")
        srv.run("blockcopy", "exp0", tmp / "copy.qcow2", "--shallow", "--finish",
                "--absolute-backing")
        srv.run("blockpull", "exp0", "--base", "exp0[2]", "--wait", "--absolute-backing")
    assert backing_of(top) == str(base)
    assert backing_of(tmp / "copy.qcow2") == str(top)
    assert backing_of(tmp / "snap.qcow2") == str(base)
    for img in (top, tmp / "snap.qcow2", tmp / "copy.qcow2"):
        compare_elsewhere(img, ref)


def test_keep_relative_and_absolute_conflict(tmp, served):
    base, mid, top, ref, srv = served
    p = srv.run("blockcommit", "exp0", "--top", "exp0[1]", "--keep-relative",
                "--absolute-backing", check=False)
    assert p.returncode == 1 and "mutually exclusive" in p.stderr, (p.stdout, p.stderr)
    assert json.loads(qemu_img("info", "-U", "--output=json", top).stdout)[
        "backing-filename"] == "mid.qcow2"
