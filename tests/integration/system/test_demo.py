"""`make demo` keeps working: scripts/demo.sh (the offline tour) and scripts/demo-live.sh (live block
copy of base <- sn1 <- sn2 onto base <- active under a writing NBD guest) run against this build
($VDISK_BUILD), exit 0, and print the lines a person relies on. Both scripts verify their own
results with QEMU's tools and exit non-zero on a mismatch; here we also check they said so.
"""
import os
import re
import subprocess

from conftest import BUILD, ROOT, VDISK

SCRIPTS = os.path.join(ROOT, "scripts")


def run_script(name, timeout):
    env = dict(os.environ, VDISK_BUILD=BUILD, VDISK=VDISK)
    env.pop("KEEP", None)
    p = subprocess.run(["bash", os.path.join(SCRIPTS, name)], capture_output=True, text=True,
                       timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{out[-6000:]}"
    assert "AddressSanitizer" not in out and "runtime error:" not in out, out[-6000:]
    assert "FAIL" not in p.stdout, p.stdout[-6000:]
    return p


def test_demo_offline():
    p = run_script("demo.sh", timeout=120)
    assert p.stdout.rstrip().endswith("demo: all verifications passed"), p.stdout[-3000:]
    assert "==> 1." in p.stdout and "$ vdisk create -f qcow2 base.qcow2 64M" in p.stdout
    assert "ok: qemu-img compare: sn2 shows the expected guest content" in p.stdout


def test_demo_live():
    p = run_script("demo-live.sh", timeout=120)
    out = p.stdout
    assert out.rstrip().endswith("demo-live: all verifications passed"), out[-3000:]
    # The seed's steps, as a person reads them.
    for step in range(1, 9):
        assert f"==> {step}." in out, f"step {step} missing:\n{out}"
    m = re.search(r"^   base\.qcow2 is node '([^']+)'$", out, re.M)
    assert m, out
    assert re.search(r"^\$ vdisk blockcopy disk0 active\.qcow2 --reuse-external --format qcow2 "
                     r"--base-node '?%s'? .*--pivot --verbose$" % re.escape(m.group(1)), out, re.M), out
    assert "\nSuccessfully pivoted\n" in out
    assert re.search(r"vdiskd: pivoted to the target; guest I/O paused [\d.]+ ms", out), out
    # The guest wrote during the copy: rounds completed between start and pivot.
    m2 = re.search(r"copy \+ pivot took [\d.]+ s; the guest completed (\d+) rounds meanwhile", out)
    assert m2 and int(m2.group(1)) > 0, out
    # After the pivot the export is active.qcow2 over base: base <- active.
    after = out[out.index("Successfully pivoted"):]
    rows = re.findall(r"^ exp0(?:\[\d\])?\s+\S+\s+qcow2\s+(\S+)$", after, re.M)
    assert [os.path.basename(r) for r in rows[:2]] == ["active.qcow2", "base.qcow2"], after
    chain = out[out.index("==> 6."):out.index("==> 7.")]
    images = re.findall(r"^image: (\S+)$", chain, re.M)
    assert images == ["active.qcow2", "base.qcow2"], chain
    assert "backing file: base.qcow2" in chain
    for line in ("ok: active.qcow2's backing file is base.qcow2",
                 "ok: the guest reads (over NBD, after the pivot) exactly what it wrote",
                 "ok: vdiskd exited 0",
                 "ok: qemu-img check base.qcow2 is clean",
                 "ok: qemu-img check sn1.qcow2 is clean",
                 "ok: qemu-img check sn2.qcow2 is clean",
                 "ok: qemu-img check active.qcow2 is clean",
                 "ok: qemu-img compare active.qcow2 (base <- active) with the model",
                 "ok: base was not copied: active holds only sn1+sn2's data and the guest's writes"):
        assert line in out, f"missing {line!r}:\n{out}"
