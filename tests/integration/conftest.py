"""Shared fixtures for vdisk's integration tests.

Binaries come from $VDISK_BUILD (default: build/ at the repo root). Real peers (qemu-img, qemu-io,
qemu-nbd, nbdinfo, ...) are the oracle; helpers here run them and fail loudly with their output.
"""
import hashlib
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("VDISK_BUILD", os.path.join(ROOT, "build"))
VDISK = os.path.join(BUILD, "src", "tools", "vdisk")
VDISKD = os.path.join(BUILD, "src", "tools", "vdiskd")

# ASan: abort on the first error so a memory bug is a failed test, not a log line.
os.environ.setdefault("ASAN_OPTIONS", "abort_on_error=1:detect_leaks=1")
os.environ.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")


def run(cmd, check=True, timeout=120, input=None):
    """Run a command; return CompletedProcess with text output. check=True asserts exit 0."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def vdisk(*args, check=True, timeout=120, input=None):
    return run([VDISK, *map(str, args)], check=check, timeout=timeout, input=input)


def qemu_img(*args, check=True, timeout=120):
    return run(["qemu-img", *map(str, args)], check=check, timeout=timeout)


def qemu_io(*args, check=True, timeout=120):
    return run(["qemu-io", *map(str, args)], check=check, timeout=timeout)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def assert_qemu_check_clean(path, fmt="qcow2"):
    """qemu-img check must report no corruption and no leak (exit 0)."""
    p = qemu_img("check", "-f", fmt, path, check=False)
    assert p.returncode == 0, f"qemu-img check {path}: exit {p.returncode}\n{p.stdout}{p.stderr}"


def assert_not_crashed(p):
    """A failing command must fail cleanly: an exit code, not a signal or a sanitizer report."""
    assert p.returncode >= 0, f"killed by signal {-p.returncode}\n{p.stderr}"
    assert "AddressSanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
