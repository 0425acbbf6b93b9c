"""vdisk installed like a package: `make install DESTDIR=...` puts vdisk, vdiskd, their man pages,
the systemd unit and bash completion in place, and each works where it was installed: the
binaries run (an image made by the installed vdisk is served by the installed vdiskd and read by
qemu-io), man renders the pages without a warning, systemd-analyze verify accepts the unit, and
bash completion offers a command's options."""
import os
import re
import subprocess

import pytest

from conftest import BUILD, ROOT, daemon_log, qemu_img, qemu_io, run, wait_unix_listening

# `make install` on the build dir runs once (module fixture): keep these on one xdist worker.
pytestmark = pytest.mark.xdist_group("install")

PREFIX = "/usr/local"
OPTION = re.compile(r"(?:^|[][ |'(])(--?[a-zA-Z][-a-zA-Z0-9]*)")


def help_commands(vdisk):
    """{command: its options} from `vdisk --help`'s "Command syntax:" section: the list the man
    page and the bash completion must cover (the completion reads the same section)."""
    section = run([vdisk, "--help"]).stdout.split("Command syntax:\n")[1].split("\n\n")[0]
    cmds, cur = {}, None
    for line in section.splitlines():
        m = re.match(r"  ([a-z][a-z0-9-]*)( |$)", line)
        if m:
            cur = m[1]
            cmds[cur] = set()
        cmds[cur].update(OPTION.findall(line))
    return cmds


@pytest.fixture(scope="module")
def dest(tmp_path_factory):
    """A DESTDIR with the build installed by `make install` (the build dir of this test run)."""
    d = tmp_path_factory.mktemp("destdir")
    # `make install` builds first: on a stale build dir that would relink the binaries the other
    # tests (and xdist workers) are running. Install what was tested, or say why not.
    dry = run(["ninja", "-C", BUILD, "-n"], timeout=120).stdout
    assert "no work to do" in dry, f"{BUILD} is older than the sources (rebuild it):\n{dry}"
    run(["make", "-C", ROOT, "install", f"BUILD={BUILD}", f"PREFIX={PREFIX}", f"DESTDIR={d}"],
        timeout=600)
    return d


def installed(dest, *parts):
    return os.path.join(str(dest), PREFIX.lstrip("/"), *parts)


def test_installs_every_file(dest):
    for path, mode in [(("bin", "vdisk"), 0o755), (("bin", "vdiskd"), 0o755),
                       (("share", "man", "man1", "vdisk.1"), 0o644),
                       (("share", "man", "man8", "vdiskd.8"), 0o644),
                       (("lib", "systemd", "system", "vdiskd.service"), 0o644),
                       (("share", "bash-completion", "completions", "vdisk"), 0o644)]:
        p = installed(dest, *path)
        assert os.path.isfile(p), f"not installed: {p}"
        assert os.stat(p).st_mode & 0o777 == mode, f"{p}: mode {os.stat(p).st_mode & 0o777:o}"


def test_installed_binaries_serve_an_image(dest, tmp):
    vdisk, vdiskd = installed(dest, "bin", "vdisk"), installed(dest, "bin", "vdiskd")
    assert run([vdisk, "--version"]).stdout.startswith("vdisk version ")
    img = tmp / "d.qcow2"
    run([vdisk, "create", "-q", "-f", "qcow2", img, "4M"])
    run([vdisk, "io", "-f", "qcow2", "-c", "write -P 0x3c 64k 128k", img])
    assert qemu_img("check", "-f", "qcow2", img, check=False).returncode == 0
    sock = str(tmp / "nbd.sock")
    with daemon_log(tmp / "vdiskd.log") as log:
        p = subprocess.Popen([vdiskd, "--blockdev", "driver=qcow2,node-name=n0,file.driver=file,"
                              f"file.filename={img}", "--nbd-server",
                              f"addr.type=unix,addr.path={sock}",
                              "--export", "type=nbd,id=e0,node-name=n0,name=d"],
                             stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_unix_listening(sock, p)
            qemu_io("-r", "-f", "raw", "-c", "read -P 0x3c 64k 128k", "-c", "read -P 0 0 64k",
                    f"nbd+unix:///d?socket={sock}")
            p.terminate()
            assert p.wait(timeout=30) == 0
        finally:
            p.kill()
            p.wait()


@pytest.mark.parametrize("page", ["man1/vdisk.1", "man8/vdiskd.8"])
def test_man_page_renders_without_warnings(dest, page):
    p = subprocess.run(["man", "--warnings", "-l", installed(dest, "share", "man", page)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MANWIDTH": "80"})
    assert p.returncode == 0 and p.stderr == "", p.stderr
    text = re.sub(".\b", "", p.stdout)  # overstrike (bold, underline) to plain text
    name = os.path.basename(page).split(".")[0]
    assert "\nNAME\n" in text and f"\n       {name} - " in text
    if name == "vdisk":
        # every command of `vdisk --help` with all its options (one line each: no filling)
        wide = subprocess.run(["man", "--nh", "--nj", "-l", installed(dest, "share", "man", page)],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "MANWIDTH": "1000"}).stdout
        entries = {m[1]: m[0] for m in re.finditer(r"(?m)^       ([a-z][a-z0-9-]*) .*$",
                                                    re.sub(".\b", "", wide))}
        cmds = help_commands(installed(dest, "bin", "vdisk"))
        assert len(cmds) >= 20 and {"amend", "bitmap", "dd", "bench", "blockcopy"} <= set(cmds)
        missing = {c: sorted(opts - set(OPTION.findall(entries.get(c, ""))))
                   for c, opts in cmds.items()}
        missing = {c: o for c, o in missing.items() if c not in entries or o}
        assert not missing, f"vdisk(1) does not describe {missing}"


def test_systemd_unit_verifies(dest, tmp):
    unit = open(installed(dest, "lib", "systemd", "system", "vdiskd.service")).read()
    assert f"ExecStart={PREFIX}/bin/vdiskd --qmp /run/vdisk/vdiskd.qmp" in unit
    # systemd-analyze checks that ExecStart is executable and Documentation= man pages exist:
    # point both at the DESTDIR (the unit as installed, its bindir seen from this machine).
    check = tmp / "vdiskd.service"
    check.write_text(unit.replace(f"{PREFIX}/bin/", installed(dest, "bin") + "/"))
    p = subprocess.run(["systemd-analyze", "verify", str(check)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "MANPATH": installed(dest, "share", "man")})
    assert p.returncode == 0 and p.stderr == "" and p.stdout == "", p.stdout + p.stderr


def complete(dest, *words):
    """What bash offers (COMPREPLY) for the command line `words`, the last one being completed."""
    script = (f'source {installed(dest, "share", "bash-completion", "completions", "vdisk")}\n'
              'complete -p vdisk\n'
              'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _vdisk\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    p = subprocess.run(["bash", "--norc", "--noprofile", "-i", "-c", script, "bash", *words],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       env={**os.environ, "PATH": installed(dest, "bin") + ":/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "complete -F _vdisk vdisk"
    return lines[1:]


def test_bash_completion_offers_commands_and_their_options(dest):
    cmds = help_commands(installed(dest, "bin", "vdisk"))
    assert complete(dest, "vdisk", "") == list(cmds)
    for c, opts in cmds.items():
        offered = {o.rstrip("=") for o in complete(dest, "vdisk", c, "-")}
        assert offered >= opts, f"{c}: not offered {sorted(opts - offered)}"
    assert complete(dest, "vdisk", "re") == ["rebase", "resize"]
    assert complete(dest, "vdisk", "block") == ["blockcommit", "blockcopy", "blockjob",
                                                "blockpull"]
    assert complete(dest, "vdisk", "create", "-") == ["-q", "-f", "-b", "-F", "-u", "-o"]
    assert complete(dest, "vdisk", "resize", "--") == ["--preallocation=", "--shrink"]
    assert complete(dest, "vdisk", "blockcopy", "disk0", "/x.qcow2", "--pi") == ["--pivot"]
    assert complete(dest, "vdisk", "--allow-probe", "info", "--b") == ["--backing-chain"]
    assert complete(dest, "vdisk", "--ver") == ["--version"]
