#!/usr/bin/python3
"""plot.py - the guest's IOPS and latency over time through each block job, vdiskd beside QSD.

Reads a jobs.json written by bench/jobs_bench.py (each loaded scenario's fio timeline in bins of
0.1 s, relative to the job command) and draws one row per scenario - IOPS on the left, mean
completion latency (log scale) on the right - with vertical marks at READY and BLOCK_JOB_COMPLETED
of each daemon. The repetition drawn is the one whose job-window IOPS is the median of its runs.
Needs gnuplot (Debian: gnuplot-nox). Usage: plot.py JOBS.json OUT.png
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

COLORS = {"vdiskd": "#1f77b4", "qsd": "#d62728"}
LABELS = {"vdiskd": "vdiskd", "qsd": "QSD"}


def median_run(runs):
    ok = [r for r in runs if r.get("fio", {}).get("series")]
    if not ok:
        return None
    m = statistics.median_low([r["fio"]["iops"] for r in ok])
    return next(r for r in ok if r["fio"]["iops"] == m)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py JOBS.json OUT.png")
    j = json.load(open(sys.argv[1]))
    out = os.path.abspath(sys.argv[2])
    rows = []
    for name, by in j["results"].items():
        if name.startswith("baseline") or "(idle)" in name:
            continue
        runs = {dk: median_run(by.get(dk, [])) for dk in ("vdiskd", "qsd")}
        runs = {dk: r for dk, r in runs.items() if r}
        if runs:
            rows.append((name, runs))
    if not rows:
        sys.exit("plot: no timeline in " + sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="vdisk-plot-")
    g = [f"set terminal pngcairo size 1400,{260 * len(rows) + 60} font 'sans,9'",
         f"set output '{out}'",
         f"set multiplot layout {len(rows)},2 title 'Guest 4k random writes over NBD during each "
         f"job (bins of 0.1 s; t = 0: job command; dashed: READY, solid: COMPLETED)'",
         "set grid", "set key top right", "set xlabel 's'"]
    for name, runs in rows:
        plots_iops, plots_lat, marks = [], [], []
        for dk, r in runs.items():
            s = r["fio"]["series"]
            path = os.path.join(tmp, f"{len(g)}-{dk}.dat")  # unique per row and daemon
            with open(path, "w") as f:
                for i, (n, mean) in enumerate(zip(s["iops"], s["mean_ms"])):
                    t = s["t0"] + (i + 0.5) * s["step"]
                    f.write(f"{t:.3f} {n} {mean if mean is not None else 'NaN'}\n")
            c = COLORS[dk]
            plots_iops.append(f"'{path}' using 1:2 with lines lw 1.5 lc rgb '{c}' "
                              f"title '{LABELS[dk]}'")
            plots_lat.append(f"'{path}' using 1:3 with lines lw 1.5 lc rgb '{c}' "
                             f"title '{LABELS[dk]}'")
            for key, dt in (("ready_s", 2), ("completed_s", 1)):
                if r.get(key) is not None:
                    marks.append(f"set arrow from {r[key]:.3f}, graph 0 to {r[key]:.3f}, graph 1 "
                                 f"nohead lc rgb '{c}' dt {dt}")
        for title, ylabel, plots, extra in ((f"{name}: guest IOPS", "IOPS", plots_iops,
                                             ["unset logscale y", "set yrange [0:*]"]),
                                            (f"{name}: guest mean latency", "ms", plots_lat,
                                             ["set logscale y", "set yrange [*:*]"])):
            g += ["unset arrow"] + marks + extra + [f"set title '{title}'",
                                                    f"set ylabel '{ylabel}'",
                                                    "plot " + ", ".join(plots)]
    g.append("unset multiplot")
    script = os.path.join(tmp, "plot.gp")
    with open(script, "w") as f:
        f.write("\n".join(g) + "\n")
    p = subprocess.run(["gnuplot", script], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"plot: gnuplot failed:\n{p.stderr}")
    for fn in os.listdir(tmp):
        os.unlink(os.path.join(tmp, fn))
    os.rmdir(tmp)
    print(f"plot: wrote {out} ({len(rows)} scenarios)")


if __name__ == "__main__":
    main()
