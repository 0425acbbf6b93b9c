"""Every QMP command's arguments are type-checked exactly as QEMU checks them.

Table-driven with qemu-storage-daemon as the oracle: the tables are QSD's own schema
(query-qmp-schema). For every command vdiskd offers, every top-level member (and, for the unions
blockdev-add and block-export-add, the members of the variant used) is sent with values of each
wrong JSON type, each required member is left out once, and one unexpected member is added. vdiskd's
error (class and text) must equal QSD's for the same message, and the bad command must change
nothing in vdiskd: nodes, jobs, exports, and the files in the test directory.
"""
import hashlib
import json
import os
import re

import pytest

from conftest import qemu_img
from qmp_client import start_qsd, start_vdiskd


# A reply that comes from argument checking (the QAPI input visitor), not from the command.
ARG_ERROR = re.compile(r"^(Invalid parameter type for '[^']*', expected: \S+"
                       r"|Parameter '[^']*' (is missing|is unexpected|expects \S+"
                       r"|does not accept value '.*'))$")

# Members vdiskd adds to QEMU's commands (QSD would call them unexpected): checked on vdiskd alone.
VDISK_EXTENSIONS = {"drive-mirror": {"base-node": "string", "x-backing-matches": "boolean"},
                    "blockdev-mirror": {"base-node": "string", "x-backing-matches": "boolean"}}


def valid_args(tmp):
    """Well-typed values for each required member, naming nothing that exists: once the types
    pass, every command fails on its first lookup, so no case starts anything (not even where
    QEMU accepts a value this test sends as "wrong", such as a negative speed)."""
    nodir = f"{tmp}/no-such-dir"
    return {
        "blockdev-add": {"driver": "qcow2", "node-name": "new0",
                         "file": {"driver": "file", "filename": f"{nodir}/a.img"}},
        "blockdev-del": {"node-name": "nx"},
        "block-export-add": {"type": "nbd", "id": "e0", "node-name": "nx", "bitmaps": ["b0"]},
        "block-export-del": {"id": "ex"},
        "nbd-server-start": {"addr": {"type": "unix", "data": {"path": f"{nodir}/nbd.sock"}}},
        "nbd-server-add": {"device": "nx"},
        "nbd-server-remove": {"name": "nx"},
        "drive-mirror": {"device": "nx", "target": f"{nodir}/mirror.img", "sync": "full"},
        "blockdev-mirror": {"device": "nx", "target": "t0", "sync": "full"},
        "block-stream": {"device": "nx"},
        "blockdev-backup": {"device": "nx", "target": "t0", "sync": "full"},
        "block-commit": {"device": "nx"},
        "blockdev-snapshot-sync": {"node-name": "nx", "snapshot-file": f"{nodir}/snap.img"},
        "blockdev-snapshot": {"node": "nx", "overlay": "t0"},
        "block-job-set-speed": {"device": "jx", "speed": 0},
        "block-job-cancel": {"device": "jx"},
        "block-job-pause": {"device": "jx"},
        "block-job-resume": {"device": "jx"},
        "block-job-complete": {"device": "jx"},
        "block-job-finalize": {"id": "jx"},
        "block-job-dismiss": {"id": "jx"},
        "job-pause": {"id": "jx"},
        "job-resume": {"id": "jx"},
        "job-cancel": {"id": "jx"},
        "job-complete": {"id": "jx"},
        "job-finalize": {"id": "jx"},
        "job-dismiss": {"id": "jx"},
        "query-named-block-nodes": {},
        "block-dirty-bitmap-add": {"node": "nx", "name": "b0"},
        "block-dirty-bitmap-remove": {"node": "nx", "name": "b0"},
        "block-dirty-bitmap-clear": {"node": "nx", "name": "b0"},
        "block-dirty-bitmap-enable": {"node": "nx", "name": "b0"},
        "block-dirty-bitmap-disable": {"node": "nx", "name": "b0"},
        "block-dirty-bitmap-merge": {"node": "nx", "target": "b0", "bitmaps": ["b1"]},
        "object-add": {"qom-type": "tls-creds-x509", "id": "o0", "dir": nodir,
                       "endpoint": "server"},
        "object-del": {"id": "nx"},
        "transaction": {"actions": [{"type": "block-dirty-bitmap-add",
                                     "data": {"node": "nx", "name": "b0"}}]},
    }


# Commands vdiskd offers that qemu-storage-daemon 7.2 does not have (QEMU 8.2's block-job-change):
# no oracle to compare with, so their members' types are checked against QEMU's wording directly.
NEWER_THAN_QSD = {
    "block-job-change": ({"id": "jx", "type": "mirror", "copy-mode": "write-blocking"},
                         {"id": "string", "copy-mode": "enum"}),
}


def wrong_values(kind):
    """Values of every JSON type but kind's (ints also out of unsigned ranges)."""
    common = [None, {"a": 1}, [1]]
    return {
        "string": [5, True, 1.5] + common,
        "boolean": [0, "no"] + common,
        "int": ["5", True, 1.5, -1, 2 ** 32] + common,
        "number": ["5", True] + common,
        "enum": [5, "no-such-value"] + common,
        "object": [5, "x", True, [1], None],
        "array": [5, "x", {"a": 1}, None],
        "alternate": [5, True, 1.5, [1]],
    }.get(kind, [])


class Schema:
    """QSD's introspected schema: commands' members with a type kind per member."""

    def __init__(self, entries):
        self.by_name = {e["name"]: e for e in entries}
        self.commands = {e["name"]: e for e in entries if e["meta-type"] == "command"}

    def kind(self, type_name):
        e = self.by_name[type_name]
        mt = e["meta-type"]
        if mt == "builtin":
            return e["json-type"]
        return mt  # enum, object, array, alternate

    def members(self, command, args):
        """[(name, kind, required)] in schema order, with the variant chosen by args (unions)."""
        return [(m["name"], self.kind(m["type"]), "default" not in m)
                for m in self.object_members(self.commands[command]["arg-type"], args)]

    def object_members(self, type_name, value):
        """The schema members of an object type, with the variant value's tag picks."""
        t = self.by_name[type_name]
        out = list(t["members"])
        if "tag" in t:
            for v in t["variants"]:
                if v["case"] == value.get(t["tag"]):
                    out += self.by_name[v["type"]]["members"]
        return out

    def object_type(self, type_name):
        """The object type a member's value may be: itself, or an alternate's object branch."""
        e = self.by_name[type_name]
        if e["meta-type"] == "object":
            return type_name
        if e["meta-type"] == "alternate":
            for m in e["members"]:
                if self.by_name[m["type"]]["meta-type"] == "object":
                    return m["type"]
        return None

    def nested_cases(self, type_name, value, path):
        """(label, value) with one member inside value (an object of type_name) made wrong:
        each member of a nested object or array element, recursively; every member at this
        depth for nested objects, whose top level the caller covers itself."""
        out = []
        for m in self.object_members(type_name, value):
            name, mt = m["name"], m["type"]
            e = self.by_name[mt]
            if e["meta-type"] == "array":
                for v in wrong_values(self.kind(e["element-type"])):
                    out.append((f"{path}{name}=[{json.dumps(v)}]", {**value, name: [v]}))
                continue
            sub = self.object_type(mt)
            if sub and isinstance(value.get(name), dict):
                inner = value[name]
                cases = [(f"{path}{name}.{x['name']}={json.dumps(v)}", {**inner, x["name"]: v})
                         for x in self.object_members(sub, inner)
                         for v in wrong_values(self.kind(x["type"]))]
                cases += self.nested_cases(sub, inner, f"{path}{name}.")
                out += [(label, {**value, name: v}) for label, v in cases]
        return out


def cases(schema, command, base):
    """(label, arguments) for every wrong type, every missing required member, one unexpected."""
    out = []
    for name, kind, required in schema.members(command, base):
        for v in wrong_values(kind):
            out.append((f"{name}={json.dumps(v)}", {**base, name: v}))
        if required:
            out.append((f"without {name}", {k: v for k, v in base.items() if k != name}))
    out.append(("unexpected member", {**base, "x-no-such-member": 1}))
    out += schema.nested_cases(schema.commands[command]["arg-type"], base, "")
    return out


def state(client, tmp):
    files = {}
    for f in sorted(os.listdir(tmp)):
        p = os.path.join(tmp, f)
        if os.path.isfile(p) and f.endswith(".qcow2"):
            with open(p, "rb") as fh:
                files[f] = hashlib.sha256(fh.read()).hexdigest()
        else:
            files[f] = None
    return (client.cmd("query-named-block-nodes"), client.cmd("query-block-jobs"),
            client.cmd("query-block-exports"), files)


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("qmptypes"))
    dirs = [os.path.join(tmp, "vd"), os.path.join(tmp, "qsd")]  # each daemon its own images
    for d in dirs:
        os.makedirs(d)
        for img in ("src.qcow2", "tgt.qcow2"):
            qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, img), "1M")
    vd = start_vdiskd(dirs[0])
    qsd = start_qsd(dirs[1])
    try:
        c, q = vd.client(), qsd.client()
        for client, d in ((c, dirs[0]), (q, dirs[1])):
            for node, img in (("n0", "src.qcow2"), ("t0", "tgt.qcow2")):
                client.cmd("blockdev-add", driver="qcow2", node_name=node,
                           file={"driver": "file", "filename": os.path.join(d, img)})
        yield dirs[0], c, q, Schema(q.cmd("query-qmp-schema"))
        c.close()
        q.close()
    except BaseException:
        vd.kill()
        raise
    finally:
        qsd.kill()
    vd.stop_checked()


def vdiskd_commands():
    return sorted(valid_args("/t"))


def test_every_vdiskd_command_is_in_the_table(daemons):
    tmp, c, q, schema = daemons
    offered = {x["name"] for x in c.cmd("query-commands")}
    no_args = {n for n in offered if n in schema.commands
               and not schema.by_name[schema.commands[n]["arg-type"]]["members"]}
    # Commands without arguments are covered by test_commands_without_arguments.
    assert offered - no_args - {"qmp_capabilities"} - set(NEWER_THAN_QSD) == set(valid_args(tmp))
    assert set(valid_args(tmp)) <= set(schema.commands)


def test_commands_without_arguments(daemons):
    tmp, c, q, schema = daemons
    offered = sorted(x["name"] for x in c.cmd("query-commands"))
    checked = 0
    for name in offered:
        if name == "qmp_capabilities" or name not in schema.commands or name == "quit":
            continue
        if schema.by_name[schema.commands[name]["arg-type"]]["members"]:
            continue
        for args in ({"x-no-such-member": 1}, {"flat": 5}):
            assert c.execute(name, args) == q.execute(name, args), (name, args)
            checked += 1
    assert checked >= 6  # query-version, query-commands, query-block, query-jobs, ...


@pytest.mark.parametrize("command", vdiskd_commands())
def test_wrong_types_match_qsd_and_change_nothing(daemons, command):
    tmp, c, q, schema = daemons
    base = valid_args(tmp)[command]
    before = state(c, tmp)
    mismatches = []
    compared = 0
    for label, args in cases(schema, command, base):
        mine, theirs = c.execute(command, args), q.execute(command, args)
        me, qe = mine.get("error", {}), theirs.get("error", {})
        if not (ARG_ERROR.match(qe.get("desc", "")) or ARG_ERROR.match(me.get("desc", ""))):
            continue  # the types were right for QEMU: semantics, not this test's subject
        compared += 1
        if mine != theirs:
            mismatches.append(f"{label}: vdiskd {mine} / qsd {theirs}")
        assert state(c, tmp) == before, f"{command} {label} changed vdiskd's state"
    assert not mismatches, "\n".join(mismatches)
    assert compared >= len(schema.members(command, base)), compared


@pytest.mark.parametrize("command", sorted(VDISK_EXTENSIONS))
def test_vdisk_extension_members_are_typed(daemons, command):
    tmp, c, q, schema = daemons
    base = valid_args(tmp)[command]
    before = state(c, tmp)
    for name, kind in VDISK_EXTENSIONS[command].items():
        for v in wrong_values(kind):
            r = c.execute(command, {**base, name: v})
            assert r == {"error": {"class": "GenericError", "desc":
                                   f"Invalid parameter type for '{name}', expected: {kind}"}}, r
            assert state(c, tmp) == before


@pytest.mark.parametrize("command", sorted(NEWER_THAN_QSD))
def test_commands_newer_than_qsd_are_typed(daemons, command):
    tmp, c, q, schema = daemons
    base, members = NEWER_THAN_QSD[command]
    before = state(c, tmp)
    for name, kind in members.items():
        for v in wrong_values(kind):
            if kind == "enum" and isinstance(v, str):
                continue  # a bad enum value is a semantic error, worded per enum
            r = c.execute(command, {**base, name: v})
            assert r == {"error": {"class": "GenericError", "desc":
                                   f"Invalid parameter type for '{name}', expected: string"}}, r
            assert state(c, tmp) == before


# SocketAddress's members by value, not only by JSON type: QEMU checks an unsigned member's range
# after reading it as a uint64 and then names the member without its path ("to" is a uint16).
SOCKADDR_VALUES = [{"to": -1}, {"to": 65536}, {"to": "1"}, {"mptcp": "yes"}, {"mptcp": 1},
                   {"mptcp": True, "x-no-such-member": 1}, {"numeric": True, "keep-alive": 0}]


@pytest.mark.parametrize("extra", SOCKADDR_VALUES, ids=lambda e: json.dumps(e, sort_keys=True))
@pytest.mark.parametrize("command", ["blockdev-add", "nbd-server-start"])
def test_socket_address_members_as_qsd(daemons, command, extra):
    tmp, c, q, schema = daemons
    inet = {"host": "127.0.0.1", "port": "1", **extra}
    if command == "blockdev-add":
        args = {"driver": "nbd", "node-name": "nbd0", "export": "e",
                "server": {"type": "inet", **inet}}
    else:
        args = {"addr": {"type": "inet", "data": inet}}
    before = state(c, tmp)
    want, got = q.execute(command, args), c.execute(command, args)
    assert "error" in want, want
    assert got == want
    assert state(c, tmp) == before
