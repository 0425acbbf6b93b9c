"""blockcopy --verify / drive-mirror x-verify (issue 9, item 5): before the pivot the job compares
every byte the guest reads from the source with what the target reads on its own, and refuses to
pivot on a difference, naming the first differing offset.

A real NBD client writes during the copy. The difference is made by writing into the target file
behind the daemon's back while the job is in its mirrored phase (a raw target: file offset = disk
offset), as a bad disk or a bug in the copy would.
"""
import pytest

from conftest import qemu_img
from qmp_client import QMPClient
from test_virsh_cli import Server, NbdGuest, make_chain, domblklist

MiB = 1 << 20


@pytest.fixture
def served(tmp):
    (base, top), ref = make_chain(tmp)
    srv = Server("vdiskd", tmp, top)
    guest = {}
    try:
        yield top, ref, srv, guest
    finally:
        g = guest.get("g")
        if g is not None and g.is_alive():
            g.stop_ev.set()
            g.join(60)
        srv.stop()


def test_verify_passes_and_pivots_under_guest_writes(tmp, served):
    top, ref, srv, guest = served
    model = bytearray(ref.read_bytes())
    g = guest["g"] = NbdGuest(srv.nbd, model, seed=21, lo=3 * MiB, hi=7 * MiB)
    g.start()
    g.wait_writes(10)
    dest = tmp / "copy.qcow2"
    p = srv.run("blockcopy", "exp0", dest, "--shallow", "--verify", "--pivot", timeout=120)
    assert p.stdout == "\nSuccessfully pivoted\n", (p.stdout, p.stderr)
    assert domblklist(srv) == [["exp0", str(dest)]]
    g.wait_writes(10)
    g.stop_checked()
    seen = tmp / "seen.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri(), seen)
    assert seen.read_bytes() == bytes(model)
    srv.stop()
    qemu_img("compare", "-U", "-F", "raw", dest, seen)


def test_verify_refuses_to_pivot_on_a_difference(tmp, served):
    top, ref, srv, guest = served
    dest = tmp / "copy.raw"
    p = srv.run("blockcopy", "exp0", dest, "--raw", "--verify", "--wait")
    assert p.stdout == "\nNow in mirroring phase\n", (p.stdout, p.stderr)
    bad = 5 * MiB + 4321
    with open(dest, "r+b") as f:  # the target goes bad behind the job's back
        f.seek(bad)
        old = f.read(1)
        f.seek(bad)
        f.write(bytes([old[0] ^ 0xff]))
    p = srv.run("blockjob", "exp0", "--pivot", check=False)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"differ at offset {bad}" in p.stderr, p.stderr
    # the guest stays on its disk, which still reads what it did
    assert domblklist(srv) == [["exp0", str(top)]]
    seen = tmp / "seen.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri(), seen)
    assert seen.read_bytes() == ref.read_bytes()


def test_verify_is_a_boolean(tmp, served):
    top, ref, srv, guest = served
    with QMPClient(srv.qmp) as q:
        e = q.error("drive-mirror", {"device": "disk0", "target": str(tmp / "c.qcow2"),
                                     "sync": "full", "x-verify": "yes"})
        assert "x-verify" in e and "bool" in e, e
    assert not (tmp / "c.qcow2").exists()
