#!/usr/bin/python3
"""bench.py - generate a reproducible qcow2 chain and time vdisk against qemu-img on it.

gen: base.qcow2 <- sn1.qcow2 <- sn2.qcow2, virtual 4 GiB * scale; base holds ~1.5 GiB * scale of
     seeded random (incompressible) data in scattered extents, sn1 and sn2 ~256 MiB * scale each.
     Built with qemu-img only (a sparse raw -> qemu-img convert -> qemu-img rebase -u), so the
     benchmark input does not depend on vdisk. Cached in the work dir by scale and seed.
run: for each operation, vdisk and qemu-img run the same arguments on the same files in the same
     run, interleaved, `reps` times each; median wall time and peak RSS (/usr/bin/time -v).
     The first vdisk result of each operation is checked against qemu-img's (content/backing).
Writes results.md (and results.json) to the out dir and prints the markdown.
"""
import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time

MiB, GiB = 1 << 20, 1 << 30


def sh(*args, check=True, capture=True):
    p = subprocess.run([str(a) for a in args], capture_output=capture, text=True)
    if check and p.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


# ---------------------------------------------------------------- generation

def _extents(rnd, vsize, total, min_len, max_len, align=64 * 1024):
    """Non-overlapping scattered extents adding up to ~total bytes."""
    slot = max(max_len, 4 * MiB)
    slots = list(range(vsize // slot))
    rnd.shuffle(slots)
    out, got = [], 0
    for s in slots:
        if got >= total:
            break
        ln = rnd.randrange(min_len, max_len + 1) // align * align or align
        ln = min(ln, total - got + align - 1) // align * align or align
        start = s * slot + rnd.randrange(0, (slot - ln) // align + 1) * align
        out.append((start, ln))
        got += ln
    return sorted(out), got


def _write_sparse_raw(path, vsize, extents, rnd):
    with open(path, "wb") as f:
        f.truncate(vsize)
        for off, ln in extents:
            f.seek(off)
            left = ln
            while left:
                n = min(left, 8 * MiB)
                f.write(rnd.randbytes(n))
                left -= n


def gen(work, scale, seed):
    tag = f"scale{scale:g}-seed{seed}"
    d = os.path.join(work, tag)
    stamp = os.path.join(d, "COMPLETE")
    if os.path.exists(stamp):
        return d, json.load(open(stamp))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    rnd = random.Random(seed)
    vsize = int(4 * GiB * scale) // (64 * 1024) * (64 * 1024)
    layers = [("base", int(1.5 * GiB * scale), 1 * MiB, 16 * MiB),
              ("sn1", int(256 * MiB * scale), 64 * 1024, 2 * MiB),
              ("sn2", int(256 * MiB * scale), 64 * 1024, 2 * MiB)]
    meta = {"virtual_size": vsize, "seed": seed, "scale": scale, "layers": {}}
    prev = None
    for name, total, lo, hi in layers:
        t = time.time()
        ext, got = _extents(rnd, vsize, total, lo, hi)
        raw = os.path.join(d, f"{name}.raw")
        _write_sparse_raw(raw, vsize, ext, rnd)
        img = os.path.join(d, f"{name}.qcow2")
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
        os.unlink(raw)
        if prev:
            sh("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", f"{prev}.qcow2", "-F", "qcow2", img)
        meta["layers"][name] = {"extents": len(ext), "data_bytes": got,
                                "file_bytes": os.path.getsize(img)}
        print(f"bench: generated {name}.qcow2: {len(ext)} extents, {got / MiB:.0f} MiB data "
              f"({time.time() - t:.1f} s)", flush=True)
        prev = name
    sh("qemu-img", "check", "-q", os.path.join(d, "sn2.qcow2"))
    json.dump(meta, open(stamp, "w"))
    return d, meta


# ---------------------------------------------------------------- timing

def timed(argv, cwd, rss_file):
    t = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-v", "-o", rss_file, *map(str, argv)], cwd=cwd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t
    rss = 0
    with open(rss_file) as f:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", f.read())
        if m:
            rss = int(m.group(1)) * 1024
    return p.returncode, wall, rss, p.stderr


def operations(d):
    """(name, argv after the tool name, setup(run_dir), verify(run_dir, tool) or None)."""
    def fresh(files):
        def setup(rd):
            for f in ("out.qcow2", "out.raw"):
                if os.path.exists(os.path.join(rd, f)):
                    os.unlink(os.path.join(rd, f))
            for f in files:
                dst = os.path.join(rd, f)
                if os.path.lexists(dst):
                    os.unlink(dst)
                shutil.copyfile(os.path.join(d, f), dst)
        return setup

    def link_all(rd):
        for f in ("base.qcow2", "sn1.qcow2", "sn2.qcow2"):
            p = os.path.join(rd, f)
            if not os.path.exists(p):
                os.symlink(os.path.join(d, f), p)

    ops = [
        ("convert -O qcow2 (flatten sn2)", ["convert", "-f", "qcow2", "-O", "qcow2", "sn2.qcow2", "out.qcow2"], fresh([])),
        ("convert -O raw (flatten sn2)", ["convert", "-f", "qcow2", "-O", "raw", "sn2.qcow2", "out.raw"], fresh([])),
        ("commit sn2 -> sn1", ["commit", "-f", "qcow2", "sn2.qcow2"], fresh(["sn1.qcow2", "sn2.qcow2"])),
        ("rebase (safe) sn2 onto base", ["rebase", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sn2.qcow2"],
         fresh(["sn2.qcow2"])),
        ("map --output=json sn2", ["map", "--output=json", "-f", "qcow2", "sn2.qcow2"], fresh([])),
        ("check base", ["check", "-f", "qcow2", "base.qcow2"], fresh([])),
        ("compare sn2 chain vs flat copy", ["compare", "-f", "qcow2", "-F", "qcow2", "sn2.qcow2", "flat.qcow2"], fresh([])),
    ]
    return ops, link_all


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return cpu, mem


def disk_desc(path):
    p = sh("df", "-hT", path, check=False).stdout.strip().splitlines()
    dev = p[-1].split()[0] if p else "?"
    fs = p[-1].split()[1] if p else "?"
    rota = "?"
    try:
        base = os.path.basename(os.path.realpath(dev)).rstrip("0123456789")
        rota = open(f"/sys/block/{base}/queue/rotational").read().strip()
        rota = "rotational" if rota == "1" else "non-rotational"
    except OSError:
        pass
    return f"{dev} ({fs}, {rota}; {p[-1] if p else ''})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vdisk", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--only", default="", help="comma-separated substrings of operation names")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before every timed run (root; cold-cache numbers)")
    a = ap.parse_args()

    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    d, meta = gen(a.work, a.scale, a.seed)
    gen_s = time.time() - t0
    rd = os.path.join(a.work, "run")
    shutil.rmtree(rd, ignore_errors=True)
    os.makedirs(rd)
    ops, link_all = operations(d)
    link_all(rd)
    # the flat reference for compare, made by qemu-img once
    flat = os.path.join(d, "flat.qcow2")
    if not os.path.exists(flat):
        sh("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", os.path.join(d, "sn2.qcow2"), flat)
    if not os.path.exists(os.path.join(rd, "flat.qcow2")):
        os.symlink(flat, os.path.join(rd, "flat.qcow2"))

    tools = {"vdisk": [a.vdisk], "qemu-img": ["qemu-img"]}
    if not a.drop_caches:
        # "page cache warm" must hold for the first timed run too: read the chain once, untimed.
        # (Without this the first run of the first operation - always vdisk's - read a cold
        # chain from disk: 5.37 s against 0.67-1.32 s for its other runs in one idle run.)
        for f in ("base.qcow2", "sn1.qcow2", "sn2.qcow2", "flat.qcow2"):
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(8 * MiB):
                    pass
    results = []
    for k, (name, argv, setup) in enumerate(ops):
        if a.only and not any(s in name for s in a.only.split(",")):
            continue
        samples = {t: [] for t in tools}
        rss = {t: 0 for t in tools}
        errors = []
        for rep in range(a.reps):
            # who goes first alternates per repetition and per operation, so neither tool
            # always opens an operation (the first run after a different workload pays for it)
            order = list(tools) if (rep + k) % 2 == 0 else list(tools)[::-1]
            for tool in order:
                # chain files the op modifies are fresh copies; the rest are symlinks
                for f in ("sn1.qcow2", "sn2.qcow2"):
                    p = os.path.join(rd, f)
                    if os.path.islink(p) or os.path.exists(p):
                        os.unlink(p)
                    os.symlink(os.path.join(d, f), p)
                setup(rd)
                if a.drop_caches:
                    subprocess.run(["sync"])
                    with open("/proc/sys/vm/drop_caches", "w") as f:
                        f.write("3\n")
                rc, wall, r, err = timed(tools[tool] + argv, rd, os.path.join(rd, "time.txt"))
                ok = rc == 0 or (argv[0] == "compare" and rc == 0)
                if not ok:
                    errors.append(f"{tool} rep {rep}: exit {rc}: {err.strip()[-300:]}")
                samples[tool].append(wall)
                rss[tool] = max(rss[tool], r)
                if rep == 0 and tool == "vdisk" and ok:
                    errors += verify(name, argv, rd, d)
        med = {t: statistics.median(s) for t, s in samples.items()}
        row = {"op": name, "cmd": " ".join(argv), "median_s": med, "samples_s": samples,
               "rss_bytes": rss, "ratio": med["vdisk"] / med["qemu-img"] if med["qemu-img"] else None,
               "errors": errors}
        results.append(row)
        print(f"bench: {name}: vdisk {med['vdisk']:.2f}s qemu-img {med['qemu-img']:.2f}s "
              f"ratio {row['ratio']:.2f}" + (f"  ERRORS: {errors}" if errors else ""), flush=True)
        for f in ("out.qcow2", "out.raw"):
            if os.path.exists(os.path.join(rd, f)):
                os.unlink(os.path.join(rd, f))

    write_report(a, meta, results, gen_s, d)
    shutil.rmtree(rd, ignore_errors=True)


def verify(name, argv, rd, d):
    """Check vdisk's result of one op against QEMU's view; returns error strings."""
    errs = []

    def q(*args):
        p = subprocess.run(["qemu-img", *args], cwd=rd, capture_output=True, text=True)
        return p.returncode, p.stdout + p.stderr

    ref = os.path.join(d, "flat.qcow2")
    if argv[0] == "convert":
        out = argv[-1]
        fmt = "raw" if out.endswith(".raw") else "qcow2"
        rc, o = q("compare", "-f", fmt, "-F", "qcow2", out, ref)
        if rc:
            errs.append(f"vdisk {name}: output differs from qemu-img's: {o.strip()}")
        if fmt == "qcow2":
            rc, o = q("check", "-q", out)
            if rc:
                errs.append(f"vdisk {name}: qemu-img check: {o.strip()[-300:]}")
    elif argv[0] in ("commit", "rebase"):
        for f in (["sn1.qcow2", "sn2.qcow2"] if argv[0] == "commit" else ["sn2.qcow2"]):
            rc, o = q("check", "-q", f)
            if rc:
                errs.append(f"vdisk {name}: qemu-img check {f}: {o.strip()[-300:]}")
        rc, o = q("compare", "-F", "qcow2", "sn2.qcow2", ref)
        if rc:
            errs.append(f"vdisk {name}: sn2 content changed: {o.strip()}")
    return errs


def write_report(a, meta, results, gen_s, d):
    cpu, mem = machine()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    qv = sh("qemu-img", "--version").stdout.splitlines()[0]
    vv = sh(a.vdisk, "--version", check=False).stdout.strip().splitlines()
    L = []
    L.append(f"# vdisk vs qemu-img benchmark ({now})\n")
    L.append(f"- machine: {os.cpu_count()} CPUs (nproc {sh('nproc').stdout.strip()}), {cpu}, "
             f"{mem} RAM, kernel {platform.release()}")
    L.append(f"- disk: {disk_desc(a.work)}")
    L.append(f"- tools: {vv[0] if vv else a.vdisk} vs {qv}")
    lay = meta["layers"]
    L.append(f"- input (BENCH_SCALE={meta['scale']:g}, seed {meta['seed']}): virtual "
             f"{meta['virtual_size'] / GiB:.2f} GiB; " + "; ".join(
                 f"{n}: {v['data_bytes'] / MiB:.0f} MiB random data in {v['extents']} extents "
                 f"({v['file_bytes'] / MiB:.0f} MiB file)" for n, v in lay.items()))
    L.append(f"- method: same arguments, same files, same run; {a.reps} repetitions each, vdisk "
             f"and qemu-img interleaved (order alternating per repetition and per operation), "
             f"{'page cache dropped before every run' if a.drop_caches else 'page cache warm (the chain fits in RAM)'}; "
             f"median wall time; peak RSS from /usr/bin/time -v. Chain generation took {gen_s:.0f} s.")
    L.append("")
    L.append("| operation | vdisk (s) | qemu-img (s) | vdisk/qemu-img | vdisk RSS (MiB) | qemu-img RSS (MiB) |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for r in results:
        m, rs = r["median_s"], r["rss_bytes"]
        L.append(f"| {r['op']} | {m['vdisk']:.2f} | {m['qemu-img']:.2f} | "
                 f"{r['ratio']:.2f} | {rs['vdisk'] / MiB:.0f} | {rs['qemu-img'] / MiB:.0f} |")
    errs = [e for r in results for e in r["errors"]]
    L.append("")
    if errs:
        L.append("**Errors (a time next to a failed run measures nothing):**\n")
        L += [f"- {e}" for e in errs]
    else:
        L.append("All vdisk results were verified against qemu-img (compare/check) on the first repetition.")
    L.append("")
    L.append("Samples (s): " + "; ".join(
        f"{r['op']}: vdisk {', '.join(f'{x:.2f}' for x in r['samples_s']['vdisk'])} / qemu-img "
        f"{', '.join(f'{x:.2f}' for x in r['samples_s']['qemu-img'])}" for r in results))
    text = "\n".join(L) + "\n"
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"date": now, "meta": meta, "results": results}, f, indent=1)
    print(text)
    if errs:
        sys.exit(1)


if __name__ == "__main__":
    main()
