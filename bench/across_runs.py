#!/usr/bin/env python3
"""Pools several full bench/run.sh runs: per scenario, each run's pgsidecar/PgBouncer and
pgsidecar/direct ratio (from that run's medians, as its report shows them), their median
across runs, and the lowest single repetition's ratio (repetitions are interleaved, so
rep k of each target ran back to back).

    KEEP_WORK=1 bash bench/run.sh   # three times; each prints "kept DIR"
    python3 bench/across_runs.py DIR1 DIR2 DIR3 > across.md

Speeds throughout: above 1, pgsidecar is faster (lower-is-better units are inverted).
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (same directory)


def per_rep(rows, value):
    """{rep: {target: value}} of the successful repetitions."""
    out = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        v = value(r)
        if v is not None:
            out.setdefault(r["rep"], {})[r["target"]] = v
    return out


def speed(a, b, lower_better):
    if a is None or b is None or a == 0 or b == 0:
        return None
    return b / a if lower_better else a / b


def fmt(x):
    return "n/a" if x is None else "{:.2f}".format(x)


def section(w, title, runs, key, value, lower_of=lambda name: False):
    """One table: a row per name under `key`, pooled over runs."""
    names = []
    for rows in runs:
        for n in report.ordered(rows, key):
            if n not in names:
                names.append(n)
    if not names:
        return
    w("## " + title)
    w("")
    w("| {} | per run: sidecar/bouncer | median | lowest rep | per run: sidecar/direct | median |".format(key))
    w("|---|---|---:|---:|---|---:|")
    for n in names:
        lower = lower_of(n)
        vb, vd, reps = [], [], []
        for rows in runs:
            mine = [r for r in rows if r[key] == n]
            med = {t: report.Cell([r for r in mine if r["target"] == t], value).median for t in report.TARGETS}
            vb.append(speed(med["pgsidecar"], med["pgbouncer"], lower))
            vd.append(speed(med["pgsidecar"], med["direct"], lower))
            for cells in per_rep(mine, value).values():
                reps.append(speed(cells.get("pgsidecar"), cells.get("pgbouncer"), lower))
        ok_b = [x for x in vb if x is not None]
        ok_d = [x for x in vd if x is not None]
        ok_r = [x for x in reps if x is not None]
        w("| {} | {} | {} | {} | {} | {} |".format(
            n,
            " / ".join(fmt(x) for x in vb),
            fmt(statistics.median(ok_b)) if ok_b else "n/a",
            fmt(min(ok_r)) if ok_r else "n/a",
            " / ".join(fmt(x) for x in vd),
            fmt(statistics.median(ok_d)) if ok_d else "n/a"))
    w("")


def main():
    dirs = sys.argv[1:]
    if not dirs:
        sys.exit(__doc__)
    out = []
    w = out.append
    w("# pgsidecar across {} full runs".format(len(dirs)))
    w("")
    for d in dirs:
        meta = {r["key"]: r["value"] for r in report.read_tsv(os.path.join(d, "meta.tsv"))}
        w("- {}: {} at {}".format(d, meta.get("commit", "?"), meta.get("date", "?")))
    w("")
    load = lambda name: [report.read_tsv(os.path.join(d, name)) for d in dirs]  # noqa: E731
    section(w, "pgbench (tps; tls-*: the pooler -> PostgreSQL leg over TLS)", load("runs.tsv"), "scenario", report.tps)
    section(w, "proxy CPU per transaction (µs inverted: above 1, pgsidecar spends less)",
            load("runs.tsv"), "scenario", report.cpu_us, lower_of=lambda n: True)
    # Every importer workload as units per second (rows, statements, pipelines, round
    # trips): a speed, whatever unit its report row shows.
    section(w, "importer workloads (units/s)", load("importer.tsv"), "workload",
            lambda r: float(r["units"]) / float(r["seconds"]) if r["units"] and r["seconds"] and float(r["seconds"]) > 0 else None)
    copies = [[dict(r, workload="copy-psql-1M") for r in rows] for rows in load("copy.tsv")]
    section(w, "COPY FROM STDIN, psql (seconds inverted)", copies, "workload",
            lambda r: float(r["seconds"]) if r["seconds"] else None, lower_of=lambda n: True)
    rss = load("rss.tsv")
    if any(rss):
        w("## RSS per idle client (KiB)")
        w("")
        w("| clients | pgbouncer per run | pgsidecar per run |")
        w("|---:|---|---|")
        for n in report.ordered([r for rows in rss for r in rows], "clients"):
            cols = []
            for t in report.POOLERS:
                vals = []
                for rows in rss:
                    for r in rows:
                        if r["clients"] == n and r["target"] == t and r["status"] == "ok":
                            vals.append((float(r["after_kib"]) - float(r["before_kib"])) / float(n))
                cols.append(" / ".join("{:.2f}".format(v) for v in vals) or "n/a")
            w("| {} | {} | {} |".format(n, *cols))
        w("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
