"""Usage errors of every command - a missing operand, an unknown option, an option without its
argument, a bad option value - against qemu-img 7.2's actual output: the same exit status and
the same stderr, word for word and line for line (its "Try 'qemu-img --help' for more
information" line included), the program's name aside. Nothing is created or changed."""
import os
import shutil
import subprocess

import pytest

from conftest import qemu_img, sha256, VDISK

COMMANDS = ["amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd",
            "info", "map", "measure", "rebase", "resize", "snapshot"]
# the options taking an argument, short and long, as qemu-img 7.2 declares them
NEEDS_ARG = {
    "amend": "-o -f -t", "bench": "-c -d -f -i -o -s -S -t --flush-interval --pattern",
    "bitmap": "-b -f -F -g --merge --granularity --source-file --source-format",
    "check": "-f -r -T --output --format --repair", "commit": "-f -t -b -r",
    "compare": "-f -F -T", "convert": "-f -O -B -o -l -S -t -T -m -r", "create": "-F -b -f -o",
    "dd": "-f -O", "info": "-f --output --format",
    "map": "-f -s -l --output --start-offset --max-length --format",
    "rebase": "-f -F -b -t -T", "snapshot": "-a -c -d",
}

CASES = [[], ["bogus"], ["--bogus"], ["-Z"], ["--help-x"], ["info", "--back"]]
for _c in COMMANDS:
    if _c != "measure":  # qemu-img 7.2's measure answers these with its help text: see below
        CASES += [[_c, "-Z", "a.qcow2"], [_c, "--bogus", "a.qcow2"], [_c, "--bogus=1", "a.qcow2"]]
    CASES += [[_c], [_c, "a.qcow2", "b", "c", "d"]]
for _c, _opts in NEEDS_ARG.items():
    CASES += [[_c, "a.qcow2", _o] for _o in _opts.split()]
CASES += [
    ["resize", "a.qcow2", "-f"], ["resize", "a.qcow2", "--preallocation"], ["resize", "a.qcow2"],
    ["resize", "a.qcow2", "1M", "2M"], ["resize", "--preallocation=bogus", "a.qcow2", "2M"],
    ["resize", "a.qcow2", "1Q"],
    ["check", "-r", "bad", "a.qcow2"], ["check", "--output=xml", "a.qcow2"],
    ["check", "-T", "bogus", "a.qcow2"], ["info", "--output=xml", "a.qcow2"],
    ["map", "--output=xml", "a.qcow2"], ["map", "-s", "x", "a.qcow2"], ["map", "-l", "8E", "a.qcow2"],
    ["map", "--start-offset=-1", "a.qcow2"], ["map", "--max-length", "20E", "a.qcow2"],
    ["create", "-f", "qcow2"], ["create", "-f", "qcow2", "new.qcow2", "1M", "extra"],
    ["create", "-f", "qcow2", "new.qcow2", "1Q"], ["create", "-f", "qcow2", "new.qcow2", "-1"],
    ["create", "-f", "qcow2", "new.qcow2", "8E"], ["create", "-f", "bogus", "new.raw", "1M"],
    ["create", "-f", "qcow2", "-o", ",bad", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "nonexist.qcow2", "-F", "qcow2", "new.qcow2"],
    ["create", "-f", "qcow2", "-b", "nonexist.qcow2", "-F", "qcow2", "new.qcow2", "1M"],
    ["compare", "-T", "bogus", "a.qcow2", "a.qcow2"],
    ["convert", "a.qcow2"], ["convert", "-m", "0", "a.qcow2", "o"],
    ["convert", "-S", "1Q", "a.qcow2", "o"], ["convert", "-S", "20E", "a.qcow2", "o"],
    ["convert", "-S", "513", "a.qcow2", "o"], ["convert", "-c", "-C", "a.qcow2", "o"],
    ["convert", "-n", "-o", "compat=1.1", "a.qcow2", "o"],
    ["convert", "--target-is-zero", "a.qcow2", "o"], ["convert", "-o", ",bad", "a.qcow2", "o"],
    ["convert", "-T", "bogus", "a.qcow2", "o"], ["convert", "-t", "bogus", "a.qcow2", "o"],
    ["convert", "-r", "x", "a.qcow2", "o"], ["convert", "-r", "20E", "a.qcow2", "o"],
    ["convert", "-l", "snapshot.foo=1", "a.qcow2", "o"],
    ["commit", "-t", "bogus", "a.qcow2"], ["commit", "-r", "8E", "a.qcow2"],
    ["rebase", "a.qcow2"], ["rebase", "-b", "x"], ["rebase", "-t", "bogus", "-b", "", "a.qcow2"],
    ["snapshot", "-l", "-c", "x", "a.qcow2"], ["snapshot", "-a", "x", "-d", "y", "a.qcow2"],
    ["measure", "a.qcow2", "b"], ["measure", "--size", "1M", "a.qcow2"], ["measure", "-f", "qcow2"],
    ["measure", "--size", "1Q"], ["measure", "--size", "8E"], ["measure", "--output=xml", "--size", "1M"],
    ["measure", "-O", "bogus", "--size", "1M"],
    ["amend", "-o", "compat=1.1"], ["amend", "-o", "compat=1.1", "a.qcow2", "b"],
    ["amend", "-o", ",x", "a.qcow2"],
    ["bench", "-c", "x", "a.qcow2"], ["bench", "-d", "-1", "a.qcow2"], ["bench", "-s", "0x", "a.qcow2"],
    ["bench", "-s", "3G", "a.qcow2"], ["bench", "-S", "1Q", "a.qcow2"], ["bench", "-o", "9E", "a.qcow2"],
    ["bench", "--pattern", "300", "a.qcow2"], ["bench", "--flush-interval", "x", "a.qcow2"],
    ["bench", "-i", "bogus", "a.qcow2"], ["bench", "-t", "bogus", "a.qcow2"],
    ["bench", "--flush-interval", "10", "a.qcow2"], ["bench", "-w", "--flush-interval", "1", "a.qcow2"],
    ["bitmap", "a.qcow2"], ["bitmap", "--add", "a.qcow2"], ["bitmap", "-g", "x", "--add", "a.qcow2", "b0"],
    ["bitmap", "-g", "20E", "--add", "a.qcow2", "b0"], ["bitmap", "-g", "64k", "--remove", "a.qcow2", "b0"],
    ["bitmap", "-F", "qcow2", "--add", "a.qcow2", "b0"], ["bitmap", "-b", "r.raw", "--add", "a.qcow2", "b0"],
    ["dd"], ["dd", "if=a.qcow2"], ["dd", "bs=0", "if=a.qcow2", "of=o"], ["dd", "bs=3G", "if=a.qcow2", "of=o"],
    ["dd", "foo=1", "if=a.qcow2", "of=o"], ["dd", "junk"], ["dd", "count=x", "if=a.qcow2", "of=o"],
    ["dd", "count=20E", "if=a.qcow2", "of=o"], ["dd", "skip=8E", "if=a.qcow2", "of=o"],
    ["info", "--image-opts", "driver=qcow2,file.filename=a.qcow2", "x"],
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("usage")
    qemu_img("create", "-f", "qcow2", d / "a.qcow2", "1M")
    qemu_img("create", "-f", "raw", d / "r.raw", "1M")
    return d


def run_in(cwd, cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def both(workdir, args):
    """qemu-img and vdisk with args in workdir; their results, after checking nothing changed."""
    before = {p: sha256(workdir / p) for p in sorted(os.listdir(workdir))}
    q = run_in(workdir, ["qemu-img", *args])
    for p in set(os.listdir(workdir)) - set(before):  # nothing qemu-img left may change vdisk's run
        (shutil.rmtree if (workdir / p).is_dir() else os.unlink)(workdir / p)
    v = run_in(workdir, [VDISK, *args])
    after = {p: sha256(workdir / p) for p in sorted(os.listdir(workdir))}
    assert after == before, (args, v.stderr)
    return q, v


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a) or "(none)")
def test_usage_error_as_qemu_img(workdir, args):
    q, v = both(workdir, args)
    assert q.returncode != 0, q.stderr
    assert (v.returncode, v.stderr.replace("vdisk", "qemu-img")) == (q.returncode, q.stderr)
    assert v.stdout == q.stdout


@pytest.mark.parametrize("args", [["-Z", "a.qcow2"], ["--bogus", "a.qcow2"], ["a.qcow2", "-O"],
                                  ["a.qcow2", "--size"]])
def test_measure_usage_error_exits_1_where_qemu_img_exits_0(workdir, args):
    """qemu-img 7.2's measure (alone) lets getopt print "measure: ..." and prints its whole help
    with exit status 0; vdisk says it as for every other command and exits 1 (README)."""
    q, v = both(workdir, ["measure", *args])
    assert q.returncode == 0 and q.stderr.startswith("measure: ") and "Command syntax:" in q.stdout
    opt = args[0] if args[0].startswith("-") else args[1]
    what = "unrecognized option" if args[0].startswith("-") else "missing argument for option"
    assert (v.returncode, v.stdout) == (1, "")
    assert v.stderr == f"vdisk: {what} '{opt}'\nTry 'vdisk --help' for more information\n"
