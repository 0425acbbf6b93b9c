"""NBD over TLS, server side: vdiskd with tls-creds-x509 / tls-creds-psk (QEMU's objects and
option syntax) serves qemu-img, qemu-io and nbdinfo as TLS clients; a client without TLS, with a
certificate from another CA, trusting another CA, with the wrong PSK key, or failing tls-authz gets
no data. Certificates come from certtool at test time (tls_helpers.py)."""
import json
import os
import socket
import struct

import pytest

from conftest import free_port, qemu_img, qemu_io, run
from qmp_client import start_qsd, start_vdiskd
from tls_helpers import CA, psk_dir

PATTERN = 0x5A
IHAVEOPT = 0x49484156454F5054
NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_GO = 1, 3, 5, 7
NBD_REP_ACK = 1
NBD_REP_ERR_POLICY = (1 << 31) | 2
NBD_REP_ERR_INVALID = (1 << 31) | 3
NBD_REP_ERR_TLS_REQD = (1 << 31) | 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("pki"))
    ca, other = CA(f"{base}/ca"), CA(f"{base}/other", cn="another CA")
    return {
        "server": ca.issue(f"{base}/server", "server"),
        "client": ca.issue(f"{base}/client", "client"),
        "client2": ca.issue(f"{base}/client2", "client", cn="client2"),
        # a client whose certificate another CA signed (the server must refuse it)
        "foreign_cert": other.issue(f"{base}/foreign-cert", "client", trust=ca),
        # a client that trusts another CA only (it must refuse the server)
        "foreign_trust": ca.issue(f"{base}/foreign-trust", "client", trust=other),
        "psk_server": psk_dir(f"{base}/psk-server", key="a1" * 32),
        "psk_client": psk_dir(f"{base}/psk-client", key="a1" * 32),
        "psk_wrong": psk_dir(f"{base}/psk-wrong", key="b2" * 32),
    }


def make_image(tmp):
    img = os.path.join(str(tmp), "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io("-f", "qcow2", "-c", f"write -P {PATTERN} 0 1M", img)
    return img


def tls_vdiskd(tmp, objects, tls="tls0", authz=None):
    """vdiskd serving disk.qcow2 as 'disk' over TCP with tls-creds (from the command line)."""
    port = free_port()
    img = make_image(tmp)
    srv = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds={tls}"
    if authz:
        srv += f",tls-authz={authz}"
    args = ["-v"]  # the log says why a client was refused
    for o in objects:
        args += ["--object", o]
    args += ["--blockdev", f"driver=qcow2,node-name=d0,file.driver=file,file.filename={img}",
             "--nbd-server", srv, "--export", "type=nbd,id=e0,node-name=d0,name=disk,writable=on"]
    return start_vdiskd(tmp, *args), port, img


def x509_obj(dir, endpoint, id="tls0"):
    return f"tls-creds-x509,id={id},dir={dir},endpoint={endpoint}"


def qemu_opts(port, creds_obj):
    return (["--object", creds_obj, "--image-opts",
             f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
             "export=disk,tls-creds=tls0"])


def qemu_reads_pattern(port, creds_obj):
    """qemu-io reads the first MiB through TLS and checks every byte; (ok, output)."""
    p = run(["qemu-io", "-r", *qemu_opts(port, creds_obj), "-c", f"read -P {PATTERN} 0 1M"],
            check=False, timeout=60)
    return p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr


# ---------------- x509 ----------------

def test_x509_qemu_img_qemu_io_and_nbdinfo_are_served(tmp, pki):
    vd, port, img = tls_vdiskd(tmp, [x509_obj(pki["server"], "server")])
    try:
        client = x509_obj(pki["client"], "client")
        out = os.path.join(str(tmp), "copy.raw")
        run(["qemu-img", "convert", *qemu_opts(port, client), "-O", "raw", out], timeout=60)
        run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", out, img])
        p = run(["qemu-io", *qemu_opts(port, client), "-c", "write -P 0x77 2M 64k",
                 "-c", "read -P 0x77 2M 64k", "-c", "flush"], timeout=60)
        assert "Pattern verification failed" not in p.stdout
        p = run(["nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki['client']}"],
                timeout=60)
        assert "with TLS" in p.stdout and "export-size: 4194304" in p.stdout, p.stdout
    finally:
        vd.stop_checked()
    qemu_io("-f", "qcow2", "-c", "read -P 0x77 2M 64k", "-c", f"read -P {PATTERN} 0 1M", img)
    qemu_img("check", img)


def test_plain_clients_are_refused_before_any_data(tmp, pki):
    vd, port, img = tls_vdiskd(tmp, [x509_obj(pki["server"], "server")])
    try:
        p = qemu_img("info", f"nbd://127.0.0.1:{port}/disk", check=False)
        assert p.returncode != 0 and "TLS negotiation required" in p.stderr, p.stderr
        p = run(["nbdinfo", f"nbd://127.0.0.1:{port}/disk"], check=False)
        assert p.returncode != 0 and "export-size" not in p.stdout, p.stdout
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            greet(s)
            # every option but STARTTLS: NBD_REP_ERR_TLS_REQD, and the stream stays usable
            for opt, data in ((NBD_OPT_LIST, b""), (NBD_OPT_GO, struct.pack(">I", 4) + b"disk"
                                                   + struct.pack(">H", 0))):
                send_opt(s, opt, data)
                assert recv_rep(s)[:2] == (opt, NBD_REP_ERR_TLS_REQD)
            send_opt(s, NBD_OPT_STARTTLS, b"x")  # STARTTLS carries no data
            assert recv_rep(s)[:2] == (NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID)
            # the old EXPORT_NAME cannot be refused in band: the server hangs up, sending nothing
            send_opt(s, NBD_OPT_EXPORT_NAME, b"disk")
            assert recv_all(s) == b""
    finally:
        vd.stop_checked()


def test_certificates_of_another_ca_are_refused(tmp, pki):
    vd, port, img = tls_vdiskd(tmp, [x509_obj(pki["server"], "server")])
    try:
        # nbdinfo (libnbd): QEMU's own sanity check would refuse a foreign certificate locally
        for who in ("foreign_cert", "foreign_trust"):
            p = run(["nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki[who]}"],
                    check=False, timeout=60)
            assert p.returncode != 0 and "export-size" not in p.stdout, (who, p.stdout)
        ok, out = qemu_reads_pattern(port, x509_obj(pki["foreign_trust"], "client"))
        assert not ok and "certificate" in out.lower(), out
        ok, out = qemu_reads_pattern(port, x509_obj(pki["client"], "client"))
        assert ok, out  # the server still serves a good client
    finally:
        vd.stop_checked()
    with open(os.path.join(str(tmp), "vdiskd.log")) as f:
        log = f.read()
    assert "certificate refused" in log or "TLS handshake failed" in log, log


def test_verify_peer_off_serves_a_client_without_certificate(tmp, pki):
    nocert = os.path.join(str(tmp), "nocert")
    os.makedirs(nocert)
    run(["cp", os.path.join(pki["client"], "ca-cert.pem"), nocert])
    vd, port, img = tls_vdiskd(tmp, [x509_obj(pki["server"], "server") + ",verify-peer=off"])
    try:
        ok, out = qemu_reads_pattern(port, x509_obj(nocert, "client"))
        assert ok, out
    finally:
        vd.stop_checked()


# ---------------- PSK, over QMP ----------------

def test_psk_over_qmp_and_wrong_key_refused(tmp, pki):
    img = make_image(tmp)
    port = free_port()
    vd = start_vdiskd(tmp, "-v")
    try:
        c = vd.client()
        c.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": "tls0",
                               "dir": pki["psk_server"], "endpoint": "server"})
        c.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "d0",
                                 "file": {"driver": "file", "filename": img}})
        c.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1",
                                                                  "port": str(port)}},
              **{"tls-creds": "tls0"})
        c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"}, name="disk")
        # the server keeps its reference: deleting the object does not break it
        c.cmd("object-del", id="tls0")
        psk = "tls-creds-psk,id=tls0,endpoint=client,username=qemu,dir="
        ok, out = qemu_reads_pattern(port, psk + pki["psk_client"])
        assert ok, out
        ok, out = qemu_reads_pattern(port, psk + pki["psk_wrong"])
        assert not ok, out
        p = run(["nbdinfo", f"nbds://qemu@127.0.0.1:{port}/disk?tls-psk-file="
                 + os.path.join(pki["psk_client"], "keys.psk")], timeout=60)
        assert "with TLS" in p.stdout, p.stdout
        c.close()
    finally:
        vd.stop_checked()


# ---------------- tls-authz, with qemu-nbd as the oracle ----------------

def client_dn(pki):
    """The client certificate's subject as QEMU names it for authz: certtool prints RFC 4514
    order (CN first), QEMU's identity is GnuTLS's classic order (C first)."""
    p = run(["certtool", "-i", "--infile", os.path.join(pki["client"], "client-cert.pem")])
    for line in p.stdout.splitlines():
        if line.strip().startswith("Subject:"):
            return ",".join(reversed(line.split("Subject:", 1)[1].strip().split(",")))
    raise AssertionError(p.stdout)


def test_authz_simple_admits_the_same_clients_as_qemu_nbd(tmp, pki):
    dn = client_dn(pki)
    authz = f"authz-simple,id=auth0,identity={dn.replace(',', ',,')}"
    results = {}
    vd, port, img = tls_vdiskd(tmp, [x509_obj(pki["server"], "server"), authz], authz="auth0")
    try:
        results["vdiskd"] = [qemu_reads_pattern(port, x509_obj(pki[w], "client"))[0]
                             for w in ("client", "client2")]
    finally:
        vd.stop_checked()
    qport = free_port()
    qn = run_qemu_nbd(tmp, img, qport, ["--object", x509_obj(pki["server"], "server"),
                                        "--object", authz, "--tls-creds", "tls0",
                                        "--tls-authz", "auth0"])
    try:
        results["qemu-nbd"] = [qemu_reads_pattern(qport, x509_obj(pki[w], "client"))[0]
                               for w in ("client", "client2")]
    finally:
        qn.terminate()
        qn.wait(timeout=15)
    assert results["vdiskd"] == results["qemu-nbd"] == [True, False], results


def clients_admitted(port, pki):
    """[client1 reads through TLS, client2 reads through TLS] against the server at port."""
    return [qemu_reads_pattern(port, x509_obj(pki[w], "client"))[0] for w in ("client", "client2")]


def qemu_nbd_admits(tmp, pki, authz_obj):
    """What qemu-nbd, given authz_obj as tls-authz (id auth0), admits (of client1, client2)."""
    img = os.path.join(str(tmp), "qn.qcow2")
    if not os.path.exists(img):
        qemu_img("create", "-q", "-f", "qcow2", img, "4M")
        qemu_io("-f", "qcow2", "-c", f"write -P {PATTERN} 0 1M", img)
    port = free_port()
    qn = run_qemu_nbd(tmp, img, port, ["--object", x509_obj(pki["server"], "server"),
                                       "--object", authz_obj, "--tls-creds", "tls0",
                                       "--tls-authz", "auth0"])
    try:
        return clients_admitted(port, pki)
    finally:
        qn.terminate()
        qn.wait(timeout=15)


def test_authz_list_admits_the_same_clients_as_qemu_nbd(tmp, pki):
    dn = client_dn(pki)
    cases = [
        # exact allow of client1 under a deny policy
        (json.dumps({"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                     "rules": [{"match": dn, "policy": "allow"}]}), [True, False]),
        # globs under an allow policy: the first matching rule decides ('?' is one character)
        (json.dumps({"qom-type": "authz-list", "id": "auth0", "policy": "allow",
                     "rules": [{"match": "*CN=c?ient1", "policy": "allow", "format": "glob"},
                               {"match": "*CN=*", "policy": "deny", "format": "glob"}]}),
         [True, False]),
        # the keyval form of the command line: rules.N.member (commas in the DN doubled)
        (f"authz-list,id=auth0,policy=deny,rules.0.match={dn.replace(',', ',,')},"
         "rules.0.policy=deny,rules.1.match=*,rules.1.policy=allow,rules.1.format=glob",
         [False, True]),
        # no rules: the policy (deny by default)
        ("authz-list,id=auth0", [False, False]),
    ]
    for obj, expected in cases:
        vd, port, img = tls_vdiskd(tmp, [x509_obj(pki["server"], "server"), obj], authz="auth0")
        try:
            mine = clients_admitted(port, pki)
        finally:
            vd.stop_checked()
        assert mine == qemu_nbd_admits(tmp, pki, obj) == expected, (obj, mine)


def test_authz_listfile_reads_and_refreshes_its_file(tmp, pki):
    """qemu-nbd 7.2 (Debian) has no authz-listfile: at every step vdiskd must decide as qemu-nbd
    does with an authz-list holding the file's current rules."""
    dn = client_dn(pki)
    path = os.path.join(str(tmp), "authz.json")

    def write(text):
        with open(path + ".new", "w") as f:
            f.write(text)
        os.rename(path + ".new", path)  # atomically, as an administrator would

    def rules(match):
        return json.dumps({"policy": "deny", "rules": [{"match": match, "policy": "allow"}]})

    def oracle(text):
        return qemu_nbd_admits(tmp, pki, json.dumps({"qom-type": "authz-list", "id": "auth0",
                                                    **json.loads(text)}))

    first = rules(dn.replace("client1", "client2"))
    write(first)
    objs = [x509_obj(pki["server"], "server"), f"authz-listfile,id=auth0,filename={path}",
            f"authz-listfile,id=auth1,filename={path},refresh=off"]
    vd, port, img = tls_vdiskd(tmp, objs, authz="auth0")
    try:
        assert clients_admitted(port, pki) == oracle(first) == [False, True]
        write(rules(dn))  # rewritten while the server runs: the next client sees the new rules
        assert clients_admitted(port, pki) == oracle(rules(dn)) == [True, False]
        write('{"policy": "perhaps"}')  # unreadable rules: QEMU denies everyone until fixed
        assert clients_admitted(port, pki) == [False, False]
        write(first)
        assert clients_admitted(port, pki) == [False, True]
        c = vd.client()  # the same server, now with the refresh=off object as tls-authz
        c.cmd("nbd-server-stop")
        c.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1",
                                                                 "port": str(port)}},
              tls_creds="tls0", tls_authz="auth1")
        c.cmd("nbd-server-add", device="d0", name="disk", writable=True)
        write(rules(dn))  # not reread: auth1 keeps the rules it read at creation (first)
        assert clients_admitted(port, pki) == [False, True]
        c.close()
    finally:
        vd.stop_checked()


def test_authz_listfile_errors(tmp):
    """QEMU's texts (authz/listfile.c); qemu-storage-daemon 7.2 has no authz-listfile to compare."""
    d = str(tmp)
    files = {"ok.json": '{"rules": []}', "arr.json": "[1]", "bad.json": '{"policy": "perhaps"}',
             "type.json": '{"rules": [{"match": 5, "policy": "allow"}]}'}
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    vd = start_vdiskd(d)
    try:
        c = vd.client()

        def add(**kw):
            r = c.execute("object-add", {"qom-type": "authz-listfile", "id": "a0", **kw})
            return r.get("error", {}).get("desc", r)
        assert add() == "Parameter 'filename' is missing"
        assert add(filename=5) == "Invalid parameter type for 'filename', expected: string"
        assert add(filename=f"{d}/ok.json", refresh="no") == \
            "Invalid parameter type for 'refresh', expected: boolean"
        assert add(filename=f"{d}/none.json") == (
            f"Unable to read '{d}/none.json': Failed to open file \u201c{d}/none.json\u201d: "
            "No such file or directory")
        assert add(filename=f"{d}/arr.json") == f"File '{d}/arr.json' must contain a JSON object"
        assert add(filename=f"{d}/bad.json") == "Parameter 'policy' does not accept value 'perhaps'"
        assert add(filename=f"{d}/type.json") == \
            "Invalid parameter type for 'rules[0].match', expected: string"
        assert add(filename=f"{d}/ok.json") == {"return": {}}
        assert [x["id"] for x in c.cmd("query-block-exports")] == []  # nothing else changed
        c.close()
    finally:
        vd.stop_checked()


def run_qemu_nbd(tmp, img, port, extra, fmt="qcow2"):
    import subprocess
    import time
    log = open(os.path.join(str(tmp), "qemu-nbd.log"), "w")
    p = subprocess.Popen(["qemu-nbd", "-f", fmt, "-b", "127.0.0.1", "-p", str(port),
                          "-x", "disk", "--persistent", "--shared=4", *extra, img],
                         stdout=log, stderr=subprocess.STDOUT)
    end = time.time() + 15
    while time.time() < end:
        assert p.poll() is None, open(log.name).read()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise AssertionError("qemu-nbd did not start")


# ---------------- QMP: objects and nbd-server-start, as qemu-storage-daemon ----------------

def test_object_and_server_errors_match_qsd(tmp, pki):
    nodir = os.path.join(str(tmp), "nodir")
    sock = os.path.join(str(tmp), "n.sock")

    cases = [
        ("object-add", {"qom-type": "tls-creds-x509", "id": "t1", "dir": nodir,
                        "endpoint": "server"}),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "t1", "endpoint": "server"}),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "t1", "dir": pki["client"],
                        "endpoint": "client"}),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "t1", "dir": pki["client"],
                        "endpoint": "client"}),  # duplicate id
        ("object-add", {"qom-type": "no-such-type", "id": "t2"}),
        ("object-add", {"qom-type": "authz-simple", "id": "a1", "identity": "x"}),
        ("object-add", {"qom-type": "authz-list", "id": "a2"}),
        ("object-add", {"qom-type": "authz-list", "id": "a3", "policy": "allow",
                        "rules": [{"match": "x", "policy": "deny", "format": "glob"}]}),
        ("object-add", {"qom-type": "authz-list", "id": "a4", "policy": "maybe"}),
        ("object-add", {"qom-type": "authz-list", "id": "a4", "rules": [5]}),
        ("object-add", {"qom-type": "authz-list", "id": "a4", "rules": [{"policy": "allow"}]}),
        ("object-add", {"qom-type": "authz-list", "id": "a4",
                        "rules": [{"match": 1, "policy": "allow"}]}),
        ("object-add", {"qom-type": "authz-list", "id": "a4",
                        "rules": [{"match": "x", "policy": "allow", "format": "regex"}]}),
        ("object-add", {"qom-type": "authz-list", "id": "a4", "rules": {"match": "x"}}),
        ("object-del", {"id": "a2"}),

        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                              "tls-creds": "nope"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                              "tls-creds": "t1"}),  # a client endpoint
        ("object-del", {"id": "nope"}),
        ("object-del", {"id": "t1"}),
        ("object-del", {"id": "t1"}),
    ]
    vd = start_vdiskd(os.path.join(str(tmp)))
    qdir = os.path.join(str(tmp), "q")
    os.makedirs(qdir)
    qsd = start_qsd(qdir)
    try:
        c, q = vd.client(), qsd.client()
        for cmd, args in cases:
            mine, theirs = c.execute(cmd, args), q.execute(cmd, args)
            assert mine == theirs, (cmd, args, mine, theirs)
        c.close()
        q.close()
    finally:
        qsd.kill()
        vd.stop_checked()


def test_starttls_to_a_plain_server_is_refused_by_policy(tmp):
    img = make_image(tmp)
    port = free_port()
    vd = start_vdiskd(tmp, "--blockdev",
                      f"driver=qcow2,node-name=d0,file.driver=file,file.filename={img}",
                      "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                      "--export", "type=nbd,id=e0,node-name=d0,name=disk")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            greet(s)
            send_opt(s, NBD_OPT_STARTTLS)
            assert recv_rep(s)[:2] == (NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY)
    finally:
        vd.stop_checked()


# ---------------- vdiskd as a TLS client of qemu-nbd ----------------

def mirror_to_tls_qemu_nbd(tmp, server_creds, client_creds):
    """vdiskd mirrors a qcow2 disk (its guest writing meanwhile) onto a qemu-nbd TLS export
    through an nbd node with tls-creds; returns (source, target, error of blockdev-add or None)."""
    src = make_image(tmp)
    tgt = os.path.join(str(tmp), "target.raw")
    qemu_img("create", "-q", "-f", "raw", tgt, "4M")
    port = free_port()
    qn = run_qemu_nbd(tmp, tgt, port, ["--object", server_creds,
                                            "--tls-creds", "tls0"], fmt="raw")
    vd = start_vdiskd(tmp, "-v", "--object", client_creds)
    err = None
    try:
        c = vd.client()
        c.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "d0",
                                 "file": {"driver": "file", "filename": src}})
        r = c.execute("blockdev-add", {"driver": "nbd", "node-name": "t0", "export": "disk",
                                       "server": {"type": "inet", "host": "127.0.0.1",
                                                  "port": str(port)},
                                       "tls-creds": "tlsc"})
        if "error" in r:
            err = r["error"]["desc"]
        else:
            nodes = {n["node-name"]: n for n in c.cmd("query-named-block-nodes")}
            assert nodes["t0"]["file"].startswith("nbds://"), nodes["t0"]
            c.cmd("blockdev-mirror", job_id="m0", device="d0", target="t0", sync="full")
            c.get_event("BLOCK_JOB_READY", timeout=60)
            c.cmd("block-job-complete", device="m0")
            ev = c.get_event("BLOCK_JOB_COMPLETED", timeout=60)
            assert "error" not in ev["data"], ev
        c.close()
    finally:
        vd.stop_checked()
        qn.terminate()
        qn.wait(timeout=15)
    return src, tgt, err


def test_vdiskd_mirrors_onto_a_qemu_nbd_x509_export(tmp, pki):
    src, tgt, err = mirror_to_tls_qemu_nbd(tmp, x509_obj(pki["server"], "server"),
                                           x509_obj(pki["client"], "client", id="tlsc"))
    assert err is None, err
    qemu_img("compare", "-f", "qcow2", "-F", "raw", src, tgt)
    qemu_io("-f", "raw", "-c", f"read -P {PATTERN} 0 1M", tgt)


def test_vdiskd_mirrors_onto_a_qemu_nbd_psk_export(tmp, pki):
    src, tgt, err = mirror_to_tls_qemu_nbd(
        tmp, f"tls-creds-psk,id=tls0,endpoint=server,dir={pki['psk_server']}",
        f"tls-creds-psk,id=tlsc,endpoint=client,username=qemu,dir={pki['psk_client']}")
    assert err is None, err
    qemu_img("compare", "-f", "qcow2", "-F", "raw", src, tgt)


@pytest.mark.parametrize("who", ["psk_wrong", "foreign_trust"])
def test_vdiskd_refuses_a_server_it_cannot_authenticate(tmp, pki, who):
    if who == "psk_wrong":
        server = f"tls-creds-psk,id=tls0,endpoint=server,dir={pki['psk_server']}"
        client = f"tls-creds-psk,id=tlsc,endpoint=client,username=qemu,dir={pki[who]}"
    else:
        server = x509_obj(pki["server"], "server")
        client = x509_obj(pki[who], "client", id="tlsc")
    src, tgt, err = mirror_to_tls_qemu_nbd(tmp, server, client)
    assert err and "Could not open 'nbds://127.0.0.1:" in err, err
    with open(tgt, "rb") as f:
        assert f.read() == bytes(4 << 20)  # nothing was written


def test_x509_client_over_a_unix_socket_never_accepts_an_unverified_server(tmp, pki):
    """libnbd 1.14 verifies a server certificate only against a TCP host name: over a unix socket
    it would take any. qemu-io refuses a server its CA did not sign there; vdiskd must not
    connect either (it refuses x509 over unix unless verify-peer=off says any server will do)."""
    img = os.path.join(str(tmp), "t.raw")
    qemu_img("create", "-q", "-f", "raw", img, "1M")
    sock = os.path.join(str(tmp), "qn.sock")
    import subprocess
    import time
    qn = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", sock, "-x", "disk", "--object",
                           x509_obj(pki["server"], "server") + ",verify-peer=off",
                           "--tls-creds", "tls0", img])
    try:
        for _ in range(300):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        opts = f"driver=nbd,server.type=unix,server.path={sock},export=disk,tls-creds=tls0"
        p = run(["qemu-io", "-r", "--object", x509_obj(pki["foreign_trust"], "client"),
                 "--image-opts", opts, "-c", "read 0 4k"], check=False, timeout=60)
        assert p.returncode != 0, p.stdout  # the oracle: QEMU checks the chain over unix too
        vd = start_vdiskd(tmp, "--object", x509_obj(pki["foreign_trust"], "client", id="bad"),
                          "--object", x509_obj(pki["client"], "client", id="any") +
                          ",verify-peer=off")
        try:
            c = vd.client()
            node = {"driver": "nbd", "export": "disk", "server": {"type": "unix", "path": sock}}
            r = c.execute("blockdev-add", {**node, "node-name": "t0", "tls-creds": "bad"})
            assert "libnbd 1.14 does not verify the server's certificate" in \
                r["error"]["desc"], r
            assert c.cmd("query-named-block-nodes") == []
            # verify-peer=off: the user said any server will do, so the connection is made
            c.cmd("blockdev-add", **{**node, "node-name": "t1", "tls-creds": "any"})
            assert [n["node-name"] for n in c.cmd("query-named-block-nodes")] == ["t1"]
            c.cmd("blockdev-del", node_name="t1")
            c.close()
        finally:
            vd.stop_checked()
    finally:
        qn.terminate()
        qn.wait(timeout=15)


# ---------------- a few raw protocol helpers ----------------

def recv_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        assert chunk, "server closed"
        b += chunk
    return b


def recv_all(s):
    b = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return b
        if not chunk:
            return b
        b += chunk


def greet(s):
    magic, opts, flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert opts == IHAVEOPT
    s.sendall(struct.pack(">I", 3))


def send_opt(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def recv_rep(s):
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    return opt, rtype, recv_exact(s, length)
