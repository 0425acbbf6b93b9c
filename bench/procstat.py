"""procstat.py - what the benchmarks read about a server process from /proc (CPU time: utime+stime
of all its threads; peak RSS: VmHWM), and how they stop it. Shared by guest_nbd.py, nbd_bench.py and
jobs_bench.py (they run as scripts from bench/, so this module is on their path)."""
import os
import subprocess

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime+stime of the whole process (all threads) so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def hwm_kib(pid):
    """Peak resident set size in KiB (VmHWM), or None if the kernel does not say."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def stop(proc, timeout=60):
    """SIGTERM, then SIGKILL if it has not exited within timeout seconds; waits for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
