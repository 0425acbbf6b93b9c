"""QMP wire protocol of vdiskd: greeting, negotiation, ids, error replies, framing, events,
several clients, socket permissions, quit. qemu-storage-daemon is the oracle for shapes."""
import json
import os
import socket
import stat
import subprocess
import threading

import pytest

from conftest import VDISKD
from qmp_client import QMPClient, start_vdiskd


NEED_CAPS = "Expecting capabilities negotiation with 'qmp_capabilities'"


def shape(v):
    """Structure of a JSON value: dict keys and value types, recursively (lists: first item)."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [shape(v[0])] if v else []
    return type(v).__name__


def test_greeting_matches_qsd(vd, qsd):
    with vd.client(negotiate=False) as c, qsd.client(negotiate=False) as q:
        # QEMU offers "oob"; vdiskd offers no capability, so compare the rest.
        assert shape(c.greeting["QMP"]["version"]) == shape(q.greeting["QMP"]["version"])
        assert set(c.greeting["QMP"]) == set(q.greeting["QMP"]) == {"version", "capabilities"}
        ver = c.greeting["QMP"]["version"]
        assert ver["package"].startswith("vdisk-")
        assert ver["qemu"]["major"] == 7 and ver["qemu"]["minor"] == 2
        assert c.greeting["QMP"]["capabilities"] == []  # no out-of-band execution


def test_socket_mode_0600(vd):
    st = os.stat(vd.qmp_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_lines_end_with_crlf_like_qemu(vd):
    with vd.client(negotiate=False) as c:
        c.send_raw('{"execute": "qmp_capabilities"}\n')
        raw = c.sock.recv(4096)
        assert raw == b'{"return": {}}\r\n'


def test_negotiation(vd, qsd):
    for d in (vd, qsd):
        with d.client(negotiate=False) as c:
            # Before qmp_capabilities every command, known or not, is refused; ids are echoed.
            assert c.execute("query-version", id=5) == {
                "id": 5, "error": {"class": "CommandNotFound", "desc": NEED_CAPS}}
            assert c.error("nonexistent", cls="CommandNotFound") == NEED_CAPS
            assert c.error("qmp_capabilities", {"x": 1}) == "Parameter 'x' is unexpected"
            assert c.execute("qmp_capabilities", id="a") == {"return": {}, "id": "a"}
            assert c.error("qmp_capabilities", cls="CommandNotFound") == \
                "Capabilities negotiation is already complete, command ignored"
            assert c.cmd("query-version")["qemu"]["major"] == 7


def test_capabilities_enable_refused(vd):
    with vd.client(negotiate=False) as c:
        assert c.error("qmp_capabilities", {"enable": ["oob"]}) == "Capability 'oob' not available"
        assert "expected: array" in c.error("qmp_capabilities", {"enable": "oob"})
        assert c.execute("qmp_capabilities") == {"return": {}}


def test_id_echo_any_json(vd):
    with vd.client() as c:
        for ident in (1, "x", None, {"a": [1, {"b": None}]}, [1, 2], 1.5, True):
            r = c.execute("query-version", id=ident)
            assert r["id"] == ident and "return" in r
        r = c.execute("nonexistent", id={"k": "v"})
        assert r == {"id": {"k": "v"}, "error": {"class": "CommandNotFound",
                                                 "desc": "The command nonexistent has not been found"}}


# (raw input, expected desc, id echoed?) - texts checked against qemu-storage-daemon 7.2
BAD_INPUTS = [
    ('[1, 2]', "QMP input must be a JSON object", None),
    ('"abc"', "QMP input must be a JSON object", None),
    ('3', "QMP input must be a JSON object", None),
    ('null', "QMP input must be a JSON object", None),
    ('{"execute": 1}', "QMP input member 'execute' must be a string", None),
    ('{"id": 1}', "QMP input lacks member 'execute'", 1),
    ('{}', "QMP input lacks member 'execute'", None),
    ('{"execute": "query-version", "arguments": []}',
     "QMP input member 'arguments' must be an object", None),
    ('{"execute": "query-version", "arguments": null, "id": 2}',
     "QMP input member 'arguments' must be an object", 2),
    ('{"execute": "query-version", "extra": 1}', "QMP input member 'extra' is unexpected", None),
    ('{"execute": "query-version", "exec-oob": 1, "id": 3}',
     "QMP input member 'exec-oob' is unexpected", 3),
    ('{"exec-oob": "query-version"}', "QMP input member 'exec-oob' is unexpected", None),
    ('{"execute": "query-version", "arguments": {"a": 1}}', "Parameter 'a' is unexpected", None),
]


@pytest.mark.parametrize("raw,desc,ident", BAD_INPUTS)
def test_bad_requests(vd, raw, desc, ident):
    with vd.client() as c:
        c.send_raw(raw + "\n")
        r = c.recv()
        expect = {"error": {"class": "GenericError", "desc": desc}}
        if ident is not None:
            expect = {"id": ident, **expect}
        assert r == expect
        assert list(r) == list(expect)  # "id" first on errors, as QEMU
        assert "return" in c.execute("query-version")  # still serving


def test_bad_requests_same_as_qsd(vd, qsd):
    for raw, _, _ in BAD_INPUTS:
        replies = []
        for d in (vd, qsd):
            with d.client() as c:
                c.send_raw(raw + "\n")
                replies.append(c.recv())
        assert replies[0] == replies[1], raw


@pytest.mark.parametrize("raw", ['{"foo"}', '{"execute": "query-version", "execute": "x"}', '{"execute": }', '{"a": 1,}', '}', ']', 'nul',
                                 '{"execute": "query-version" "id": 1}', '\x01'])
def test_parse_errors_keep_serving(vd, raw):
    with vd.client() as c:
        c.send_raw(raw + "\n")
        r = c.recv()
        assert r["error"]["class"] == "GenericError"
        assert r["error"]["desc"].startswith("JSON parse error, ")
        assert "return" in c.execute("query-version", id=7)


def test_duplicate_key_like_qsd(vd):
    with vd.client() as c:
        c.send_raw('{"execute": "query-version", "id": 1, "id": 2}\n')
        assert c.recv() == {"error": {"class": "GenericError",
                                      "desc": "JSON parse error, duplicate key"}}


def test_framing_several_per_line_and_split_values(vd):
    with vd.client() as c:
        c.send_raw('{"execute": "query-version", "id": 1}{"execute": "query-version", "id": 2}\n')
        assert c.recv()["id"] == 1
        assert c.recv()["id"] == 2
        c.send_raw('{"execute":\n "query-version",\n')
        c.send_raw(' "id": "multi"\n}\n')
        assert c.recv()["id"] == "multi"
        # Byte by byte, with a string containing braces and escaped quotes.
        req = json.dumps({"execute": "query-version", "id": 'a}"{]\\['}) + "\n"
        for ch in req:
            c.send_raw(ch)
        assert c.recv()["id"] == 'a}"{]\\['
        # A stray closing brace is one error; the following value is still parsed.
        c.send_raw('} {"execute": "query-version", "id": 4}\n')
        assert c.recv()["error"]["desc"] == "JSON parse error, expecting value"
        assert c.recv()["id"] == 4


def test_unicode_and_escapes(vd):
    with vd.client() as c:
        r = c.execute("query-version", id="h\u00e9llo \u2603 \"q\" \\ \n")
        assert r["id"] == "h\u00e9llo \u2603 \"q\" \\ \n"
        c.send_raw('{"execute": "quer\\u0079-version", "id": 1}\n')
        assert "return" in c.recv()


def test_large_value_and_cap(vd):
    with vd.client() as c:
        big = "x" * (2 << 20)
        r = c.execute("query-version", id=big)
        assert r["id"] == big
        # Past the 16 MiB cap: one error, the connection and the daemon keep working.
        c.send_raw('{"execute": "query-version", "id": "' + "y" * (17 << 20) + '"}\n')
        r = c.recv()
        assert r == {"error": {"class": "GenericError",
                               "desc": "JSON parse error, input too large"}}
        assert c.execute("query-version", id=1)["id"] == 1
        c.send_raw("[" * 2000 + "]" * 2000 + "\n")
        assert c.recv()["error"]["desc"] == "JSON parse error, nesting too deep"
        assert c.execute("query-version", id=2)["id"] == 2


def test_query_commands(vd):
    with vd.client() as c:
        names = {x["name"] for x in c.cmd("query-commands")}
        for n in ["qmp_capabilities", "query-version", "query-commands", "quit", "blockdev-add",
                  "blockdev-del", "query-named-block-nodes", "query-block", "nbd-server-start",
                  "nbd-server-stop", "block-export-add", "block-export-del",
                  "query-block-exports", "nbd-server-add", "nbd-server-remove"]:
            assert n in names
        assert c.error("query-commands", {"x": 1}) == "Parameter 'x' is unexpected"
        assert c.cmd("query-block") == []


def test_many_clients_and_event_broadcast(vd, tmp):
    img = tmp / "a.raw"
    img.write_bytes(b"\0" * 65536)
    clients = [vd.client() for _ in range(5)]
    raw = QMPClient(vd.qmp_path, negotiate=False)  # not negotiated: gets no events
    try:
        c0 = clients[0]
        c0.cmd("blockdev-add", driver="raw", node_name="n0",
               file={"driver": "file", "filename": str(img)})
        sock = str(tmp / "nbd.sock")
        c0.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        c0.cmd("block-export-add", type="nbd", id="e0", node_name="n0")
        c0.cmd("block-export-del", id="e0")
        for c in clients:
            ev = c.get_event("BLOCK_EXPORT_DELETED")
            assert ev["data"] == {"id": "e0"}
            assert set(ev) == {"event", "data", "timestamp"}
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert "return" in c.execute("query-version")
        raw.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            raw.recv()
        # In QEMU the event caused by a command comes before that command's reply.
        c0.cmd("block-export-add", type="nbd", id="e1", node_name="n0")
        c0.send_raw('{"execute": "block-export-del", "arguments": {"id": "e1"}}\n')
        assert c0.recv()["event"] == "BLOCK_EXPORT_DELETED"
        assert c0.recv() == {"return": {}}
    finally:
        raw.close()
        for c in clients:
            c.close()


def test_concurrent_clients_interleaved(vd):
    errors = []

    def worker(n):
        try:
            with vd.client() as c:
                for i in range(50):
                    r = c.execute("query-version", id=[n, i])
                    assert r["id"] == [n, i]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_client_disconnect_mid_value(vd):
    c = vd.client()
    c.send_raw('{"execute": "query-vers')
    c.close()
    c = vd.client(negotiate=False)
    c.sock.close()  # gone before reading the greeting
    with vd.client() as c:
        assert "return" in c.execute("query-version")


def test_quit(vd):
    with vd.client() as other, vd.client() as c:
        assert c.error("quit", {"a": 1}) == "Parameter 'a' is unexpected"
        assert c.execute("quit", id="bye") == {"return": {}, "id": "bye"}
        assert vd.wait() == 0
        assert not os.path.exists(vd.qmp_path)
        with pytest.raises((EOFError, ConnectionResetError)):
            other.recv()


def test_stale_socket_is_replaced_and_live_one_refused(tmp):
    path = str(tmp / "qmp.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # a socket file nobody listens on: left over by a crash
    s.close()
    d = start_vdiskd(tmp)
    try:
        with d.client() as c:
            assert "return" in c.execute("query-version")
        # A second daemon on the same live socket must refuse, not steal it.
        p = subprocess.run([VDISKD, "--qmp", path], capture_output=True, text=True, timeout=20)
        assert p.returncode != 0
        assert "in use" in p.stderr
        with d.client() as c:
            assert "return" in c.execute("query-version")
    except BaseException:
        d.kill()
        raise
    d.stop_checked()
