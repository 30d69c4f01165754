#!/usr/bin/env python3
"""Markdown report for bench/profile.sh.

Usage: profile_report.py WORK_DIR [ANNOTATE_TOP_N]

Reads WORK_DIR/meta.tsv (key, value), WORK_DIR/scenarios.tsv (scenario, args) and
WORK_DIR/profile.tsv (scenario, pooler, key, value; raw counts), writes the report to
stdout. With ANNOTATE_TOP_N > 0, appends the top self-cost functions per pooler and
scenario from callgrind_annotate on the 2N dump.
"""

import csv
import re
import subprocess
import sys
from collections import defaultdict

POOLERS = ["pgbouncer", "pgsidecar"]
TOP_SYSCALLS = 8


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def num(d, key):
    try:
        return float(d[key])
    except (KeyError, ValueError):
        return None


def per_txn(d, key, txns_key):
    v, n = num(d, key), num(d, txns_key)
    if v is None or not n:
        return None
    return v / n


def instructions(d):
    ir1, ir2, n1, n2 = (num(d, k) for k in ("ir1", "ir2", "n1", "n2"))
    if None in (ir1, ir2, n1, n2) or n2 == n1:
        return None
    return (ir2 - ir1) / (n2 - n1)


def ctx(d, which=("ctx_vol", "ctx_invol")):
    vals = [num(d, k) for k in which]
    n = num(d, "ctx_txns")
    if None in vals or not n:
        return None
    return sum(vals) / n


def cpu_us(d):
    v = per_txn(d, "cpu_ns", "ctx_txns")
    return None if v is None else v / 1000.0


def user_share(d):
    """User time as a share of user + system time (clock ticks, whole process)."""
    u, s = num(d, "utime_ticks"), num(d, "stime_ticks")
    if u is None or s is None or u + s == 0:
        return None
    return u / (u + s)


def fmt(v, digits=2):
    if v is None:
        return "n/a"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def annotate(path, inclusive):
    """Function -> Ir from callgrind_annotate (every function: threshold 100%)."""
    text = subprocess.run(
        ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
         "--threshold=100", "--auto=no", "--tree=none", path],
        capture_output=True, text=True, check=True).stdout
    costs = {}
    section = None  # None, then "totals", then "functions" (the per-function list)
    for line in text.splitlines():
        if "PROGRAM TOTALS" in line and section is None:
            section = "totals"
        elif "file:function" in line:
            section = "functions"
        m = re.match(r"^\s*([0-9,]+)\s+\(\s*[0-9.]+%\)\s+(.*?)\s*$", line)
        if not m or section is None:
            continue
        name = m.group(2)
        if name == "PROGRAM TOTALS":
            costs.setdefault(name, int(m.group(1).replace(",", "")))
        elif section == "functions" and not name.startswith("=>"):
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def bare(name):
    """callgrind_annotate's "file:function [object]" without file and object."""
    name = re.sub(r" \[[^\]]*\]$", "", name)
    m = re.match(r"^(\S*?\.(?:rs|c|h|S|cc|cpp)|\?\?\?):(.*)$", name)
    return m.group(2) if m else name


def short(name):
    """Drop the long registry/toolchain path prefixes of a callgrind function name."""
    name = re.sub(r"/root/\.cargo/registry/src/[^/]+/", "", name)
    name = re.sub(r"/rustc/[0-9a-f]+/library/", "std:", name)
    name = re.sub(r" \[/usr/lib/x86_64-linux-gnu/([^\]]+)\]$", r" [\1]", name)
    name = re.sub(r" \[/[^\]]*/([^/\]]+)\]$", r" [\1]", name)
    return name.replace("|", "\\|")


def main():
    work = sys.argv[1]
    top_n = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    meta = read_tsv(f"{work}/meta.tsv")
    scenarios = read_tsv(f"{work}/scenarios.tsv")
    data = defaultdict(lambda: defaultdict(dict))
    for row in read_tsv(f"{work}/profile.tsv"):
        data[row["scenario"]][row["pooler"]][row["key"]] = row["value"]

    out = []
    w = out.append
    w("# pgsidecar vs PgBouncer: cost per transaction")
    w("")
    w("| | |")
    w("|---|---|")
    for m in meta:
        w(f"| {m['key']} | {m['value']} |")
    w("")
    w("Per transaction, of the pooler process only. **instructions**: callgrind, "
      "(I(2N) - I(N)) / N, so start-up, warm-up and logins cancel out; deterministic, "
      "independent of machine load. **ctx switches** (voluntary + involuntary, summed "
      "over threads) and **CPU** (schedstat run time, all threads): one un-traced run of "
      "NATIVE_TXNS after a warm-up; these depend on load and scheduling. **user share**: "
      "user time over user + system time, and **minor page faults**, of that run "
      "(/proc/PID/stat). **syscalls**: a "
      "separate run of NATIVE_TXNS on the same process. Native runs include the clients' "
      "logins and logouts (c per run). Ratio: pgsidecar / pgbouncer.")
    w("")
    w("| scenario | metric | pgbouncer | pgsidecar | ratio |")
    w("|---|---|---:|---:|---:|")
    metrics = [
        ("instructions/txn", instructions, 0),
        ("syscalls/txn", lambda d: per_txn(d, "sys:total", "sys_txns"), 2),
        ("ctx switches/txn", ctx, 3),
        ("  voluntary", lambda d: ctx(d, ("ctx_vol",)), 3),
        ("  involuntary", lambda d: ctx(d, ("ctx_invol",)), 3),
        ("CPU µs/txn", cpu_us, 2),
        ("  user share", user_share, 2),
        ("minor page faults/txn", lambda d: per_txn(d, "minflt", "ctx_txns"), 3),
        ("tps (native run)", lambda d: num(d, "tps"), 0),
    ]
    for s in scenarios:
        name = s["scenario"]
        for i, (label, fn, digits) in enumerate(metrics):
            vals = [fn(data[name][p]) if data[name].get(p) else None for p in POOLERS]
            first = f"{name} (`{s['args']}`)" if i == 0 else ""
            w(f"| {first} | {label} | {fmt(vals[0], digits)} | {fmt(vals[1], digits)} | "
              f"{ratio(vals[1], vals[0])} |")
    w("")

    w("## Syscalls per transaction by type")
    w("")
    for s in scenarios:
        name = s["scenario"]
        per = {}
        for p in POOLERS:
            d = data[name].get(p, {})
            n = num(d, "sys_txns")
            per[p] = {k[4:]: float(v) / n for k, v in d.items()
                      if k.startswith("sys:") and k != "sys:total" and n}
        # A pooler with syscall data that never made a call shows 0, not n/a.
        has = {p: per_txn(data[name].get(p, {}), "sys:total", "sys_txns") is not None
               for p in POOLERS}
        names = sorted(set(per["pgbouncer"]) | set(per["pgsidecar"]),
                       key=lambda k: -max(per["pgbouncer"].get(k, 0), per["pgsidecar"].get(k, 0)))
        top = names[:TOP_SYSCALLS]
        w(f"### {name} (`{s['args']}`)")
        w("")
        w("| syscall | pgbouncer | pgsidecar | ratio |")
        w("|---|---:|---:|---:|")
        for k in top:
            a, b = (per[p].get(k, 0.0 if has[p] else None) for p in POOLERS)
            w(f"| {k} | {fmt(a, 3)} | {fmt(b, 3)} | {ratio(b, a)} |")
        rest = [sum(v for k, v in per[p].items() if k not in top) if has[p] else None
                for p in POOLERS]
        w(f"| other | {fmt(rest[0], 3)} | {fmt(rest[1], 3)} | |")
        tot = [per_txn(data[name].get(p, {}), "sys:total", "sys_txns") for p in POOLERS]
        w(f"| **total** | **{fmt(tot[0], 3)}** | **{fmt(tot[1], 3)}** | {ratio(tot[1], tot[0])} |")
        w("")

    no_callgrind = any(m["key"] == "instructions" for m in meta)
    missing = []
    for s in scenarios:
        for p in POOLERS:
            d = data[s["scenario"]].get(p, {})
            if ((instructions(d) is None and not no_callgrind) or ctx(d) is None
                    or per_txn(d, "sys:total", "sys_txns") is None):
                missing.append((s["scenario"], p))
    if missing:
        w("Incomplete (a run failed or the pooler was not selected; see the log): " +
          ", ".join(f"{s}/{p}" for s, p in missing))
        w("")

    if top_n > 0:
        w("## Top functions per transaction (callgrind, (2N - N) / N per function)")
        w("")
        w("Each function's cost in the 2N process minus its cost in the N process, over N: "
          "start-up, warm-up and logins cancel out as in the instructions row. **self**: "
          "instructions in the function itself, per source file as callgrind_annotate "
          "--inclusive=no lists them (inlined code counts under its own file); **self by "
          "function**: the same summed over files, per function; **inclusive**: with its "
          "callees, frames at 99% or more (main, the event loop) left out.")
        w("")
        for s in scenarios:
            for p in POOLERS:
                d = data[s["scenario"]].get(p, {})
                f2 = d.get("cgfile")
                n = None
                if f2 and num(d, "n1") is not None and num(d, "n2") is not None:
                    n = num(d, "n2") - num(d, "n1")
                if not f2 or not n:
                    continue
                f1 = f2.replace(".2N.out", ".N.out")
                for kind in ("self", "self by function", "inclusive"):
                    inclusive = kind == "inclusive"
                    try:
                        c1 = annotate(f1, inclusive)
                        c2 = annotate(f2, inclusive)
                    except (OSError, subprocess.CalledProcessError) as e:
                        w(f"{s['scenario']} {p}: callgrind_annotate failed: {e}")
                        break
                    diff = {k: (c2.get(k, 0) - c1.get(k, 0)) / n for k in set(c1) | set(c2)}
                    tot = diff.pop("PROGRAM TOTALS", None)
                    if kind == "self by function":
                        merged = defaultdict(float)
                        for k, v in diff.items():
                            merged[bare(k)] += v
                        diff = merged
                    if inclusive and tot:
                        # main(), the event loop and the like: everything, nothing learnt.
                        diff = {k: v for k, v in diff.items() if v < 0.99 * tot}
                    w(f"### {s['scenario']} {p}: {kind}, per transaction "
                      f"(total {fmt(tot, 0)})")
                    w("")
                    w("| Ir/txn | % | function |")
                    w("|---:|---:|---|")
                    for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top_n]:
                        pct = f"{100 * v / tot:.1f}" if tot else ""
                        w(f"| {v:,.0f} | {pct} | `{short(k)}` |")
                    w("")

    print("\n".join(out))


if __name__ == "__main__":
    main()
