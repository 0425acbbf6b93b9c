"""A few trials of the vdiskd crash campaign (scripts/crash-campaign.py; `make crash-campaign
TRIALS=N` runs many): kill -9 during guest writes, stream, commit, active commit, mirror, inside
a mirror's pivot, inside a snapshot switch and inside a transaction snapshotting three disks,
then no corrupt image, no lost flushed write, and a transaction all or nothing on disk."""
import os
import subprocess
import sys

from conftest import BUILD, ROOT


def test_crash_campaign_few_trials():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "crash-campaign.py"), "8"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VDISK_BUILD": BUILD})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 corrupt images, 0 lost flushed writes" in p.stdout, p.stdout
    assert ("'writes': 1, 'stream': 1, 'commit': 1, 'active-commit': 1, 'mirror': 1, "
            "'pivot': 1, 'snapshot': 1, 'transaction': 1" in p.stdout), p.stdout
