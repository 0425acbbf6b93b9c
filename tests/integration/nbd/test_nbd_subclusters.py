"""Extended L2 (subclusters) under concurrent writers, through vdiskd's NBD server.

A write that covers a cluster only in part allocates just the subclusters it touches, and a
write-zeroes sets the zero bits of the whole subclusters it covers, as QEMU does: that is what
extended L2 is for (a 4 KiB write after a snapshot copies at most a 2 KiB subcluster from the
backing file, not a 64 KiB cluster). Four NBD connections write at once into the same clusters of
an overlay, each into its own subclusters (subcluster i belongs to connection i % 4), pipelined,
with data writes and write-zeroes mixed; the overlay must then read as the byte model, pass
qemu-img check, and hold data only in subclusters some connection touched.
"""
import json
import random
import threading

from conftest import VDISK, assert_qemu_check_clean, qemu_img, qemu_io, run
from nbd_helpers import CMD_WRITE, CMD_WZ, RawClient, start_daemon
from test_nbd_perf_paths import pipeline

MiB = 1 << 20
SIZE = 8 * MiB
CLUSTER = 65536
SC = CLUSTER // 32
CONNS = 4


def work(sock, me, seed, model, touched, results):
    try:
        rnd = random.Random(seed)
        c = RawClient(sock, timeout=120)
        c.greet()
        c.go("exp", structured=True)
        mine = list(range(me, SIZE // SC, CONNS))
        for rnd_no in range(3):
            # each request in its own subcluster of this connection: no two overlap in a burst
            reqs = {}
            for cookie, sc in enumerate(rnd.sample(mine, 300), 1):
                a = sc * SC + rnd.choice([0, 0, rnd.randrange(SC)])
                ln = rnd.choice([SC - (a - sc * SC), rnd.randint(1, SC - (a - sc * SC))])
                touched.add(sc)
                if rnd.random() < 0.25:
                    reqs[cookie] = (CMD_WZ, a, ln, 0, b"")
                    model[a:a + ln] = bytes(ln)
                else:
                    data = bytes([(rnd_no * 37 + me * 11 + sc) % 251 + 1]) * ln
                    reqs[cookie] = (CMD_WRITE, a, ln, 0, data)
                    model[a:a + ln] = data
            for k, (e, _) in pipeline(c, reqs).items():
                assert e == 0, f"request {reqs[k][:3]} failed: {e}"
        c.disc()
        c.close()
        results[me] = None
    except BaseException as e:  # noqa: BLE001 - handed to the test thread
        results[me] = e


def test_concurrent_subcluster_writes(tmp):
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    rnd = random.Random(7)
    model = bytearray(rnd.randbytes(SIZE // 2)) + bytearray(SIZE // 2)
    (tmp / "base.raw").write_bytes(bytes(model))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", tmp / "base.raw", base)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={CLUSTER}",
             "-b", base, "-F", "qcow2", top)
    node = json.dumps({"driver": "qcow2", "node-name": "n0",
                       "file": {"driver": "file", "filename": str(top)}})
    touched = set()
    d = start_daemon(tmp, top, blockdev=node)
    try:
        results = {}
        threads = [threading.Thread(target=work, args=(d.sock, i, 100 + i, model, touched, results))
                   for i in range(CONNS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(CONNS):
            if results.get(i) is not None:
                raise results[i]
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
    (tmp / "model.raw").write_bytes(bytes(model))
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", top, tmp / "model.raw", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_qemu_check_clean(str(top))
    m = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", top).stdout)
    held = {o // SC for e in m if e["depth"] == 0 and e["data"]
            for o in range(e["start"], e["start"] + e["length"], SC)}
    assert held, "nothing was allocated in the overlay"
    assert held <= touched, f"{len(held - touched)} subclusters allocated that no write touched"


def test_zeroes_across_subcluster_boundaries_as_qemu(tmp):
    """write-zeroes that start and end inside subclusters (across one boundary, or several) next to
    data, with and without a backing file: the content of vdisk's image and its whole map
    (present / zero / data) equal qemu-io's after the same commands. A zero request across the boundary of two subclusters,
    neither covered whole, once left the second one's bytes unzeroed."""
    rnd = random.Random(11)
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 9 0 512k", base)
    fixed = [  # data in subcluster 21; zeroes from inside 20 (empty) to inside 21
        ["write -P 170 43008 2048", "write -z 41831 1412"],
        ["write -P 170 43008 2048", "write -z 43000 2000", "write -z 41000 1000"],
    ]
    for case in range(26):
        back = ["-b", str(base), "-F", "qcow2"] if case % 2 else []
        cmds = fixed[case // 2] if case < 2 * len(fixed) else []
        for _ in range(4 if not cmds else 0):
            off = rnd.randrange(0, 262144)
            if rnd.random() < 0.5:
                cmds.append(f"write -P {rnd.randrange(1, 256)} {off} {rnd.randint(1, 9000)}")
            else:
                sc = off - off % SC
                a, b = sc + rnd.randrange(1, SC), sc + SC + rnd.randrange(1, SC * 3)
                cmds.append(f"write -z {a} {b - a}")
        args = [a for c in cmds for a in ("-c", c)]
        q, v = tmp / f"q{case}.qcow2", tmp / f"v{case}.qcow2"
        for img in (q, v):
            qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", *back, img, "1M")
        qemu_io("-f", "qcow2", *args, q)
        run([VDISK, "io", "-f", "qcow2", *args, str(v)])
        p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", v, q, check=False)
        assert p.returncode == 0, f"{cmds}: {p.stdout}{p.stderr}"
        # the same allocation: present / zero / data and depth of every range
        vm, qm = (qemu_img("map", "--output=json", "-f", "qcow2", i).stdout for i in (v, q))
        keys = lambda m: [(e["start"], e["length"], e["depth"], e["present"],  # noqa: E731
                           e["zero"], e["data"]) for e in json.loads(m)]
        assert keys(vm) == keys(qm), cmds
        assert_qemu_check_clean(str(v))
