#!/usr/bin/env python3
"""Turns the raw measurements bench/run.sh collected into the markdown report.

    python3 bench/report.py WORKDIR > report.md

WORKDIR holds (tab-separated, one header line each):
  meta.tsv  key, value
  runs.tsv  scenario, args, rep, target, status, tps, txns, cpu_ticks, clk_tck, reason
  rss.tsv   clients, target, status, before_kib, after_kib, reason
  copy.tsv  rep, target, status, seconds, bytes, rows, rss_before_kib, rss_peak_kib, reason
  tls.tsv   scenario, rep, target, tls, plain, detail (server connections after each run)
  importer.tsv  workload, args, rep, target, status, seconds, units, unit, bytes, statements,
            best, cpu_ticks, clk_tck, reason
"""

import csv
import os
import statistics
import sys

TARGETS = ("direct", "pgbouncer", "pgsidecar")
POOLERS = ("pgbouncer", "pgsidecar")


def read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def fnum(x, digits=0):
    if x is None:
        return "n/a"
    if digits == 0:
        return "{:,.0f}".format(x)
    return "{:,.{d}f}".format(x, d=digits)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return "{:.2f}".format(a / b)


def ordered(rows, key):
    seen = []
    for r in rows:
        if r[key] not in seen:
            seen.append(r[key])
    return seen


class Cell:
    """The repetitions of one (scenario, target): median of the successes, failures noted."""

    def __init__(self, rows, value):
        self.n = len(rows)
        ok = [r for r in rows if r["status"] == "ok"]
        self.values = [v for v in (value(r) for r in ok) if v is not None]
        self.failed = [r for r in rows if r["status"] != "ok"]
        self.median = statistics.median(self.values) if self.values else None

    def text(self, digits=0):
        if self.n == 0:
            return "skipped"
        if self.median is None:
            reason = self.failed[0]["reason"] if self.failed else "no data"
            return "fail: " + (reason or "unknown")
        s = fnum(self.median, digits)
        if self.failed:
            s += " ({}/{} failed: {})".format(len(self.failed), self.n, self.failed[0]["reason"] or "?")
        return s


def cpu_us(r):
    txns = float(r["txns"] or 0)
    if r["cpu_ticks"] in ("", None) or txns <= 0:
        return None
    return float(r["cpu_ticks"]) * 1e6 / float(r["clk_tck"]) / txns


def tps(r):
    return float(r["tps"]) if r["tps"] else None


def speed_ratio(a, b, lower_better):
    """a against b as a speed: > 1 means a is faster, whatever the unit."""
    if lower_better:
        a, b = b, a
    return ratio(a, b)


def importer_section(w, meta, batch, copy, importer):
    """One table for everything a bulk loader does, from all three sources."""

    def per_sec(r):
        return float(r["units"]) / float(r["seconds"]) if r["seconds"] and float(r["seconds"]) > 0 else None

    def mb_per_sec(r):
        return float(r["bytes"]) / 1e6 / float(r["seconds"]) if r["seconds"] and float(r["seconds"]) > 0 else None

    def ms_per_unit(r):
        return float(r["seconds"]) * 1000 / float(r["units"]) if r["seconds"] and r["units"] else None

    def rows_of(name):
        return [r for r in importer if r["workload"] == name]

    def arg(rows, flag, default="?"):
        words = rows[0]["args"].split() if rows else []
        return words[words.index(flag) + 1] if flag in words else default

    lines = []  # (label, metric, rows, value, digits, lower_better)
    if batch:
        lines.append(("multi-row INSERT, 100 rows per statement, 50 clients (pgbench `batch-insert-c50`)",
                      "rows/s", batch, lambda r: tps(r) * 100 if tps(r) is not None else None, 0, False))
    r = rows_of("importer-psycopg-executemany")
    if r:
        lines.append(("psycopg 3 `executemany`, {} rows per transaction, {} transactions".format(
            fnum(int(arg(r, "--rows"))), arg(r, "--repeat")), "rows/s", r, per_sec, 0, False))
    r = rows_of("importer-asyncpg-executemany")
    if r:
        lines.append(("asyncpg `executemany`, same (default statement cache)", "rows/s", r, per_sec, 0, False))
    r = rows_of("importer-asyncpg-executemany-nocache")
    if r:
        lines.append(("asyncpg `executemany`, same, `statement_cache_size=0`", "rows/s", r, per_sec, 0, False))
    if copy:
        lines.append(("COPY FROM STDIN, psql `\\copy`, {} rows".format(fnum(int(copy[0]["rows"]))), "MB/s", copy,
                      lambda r: float(r["bytes"]) / 1e6 / float(r["seconds"]) if r["seconds"] else None, 1, False))
    r = rows_of("importer-psycopg-copy")
    if r:
        lines.append(("COPY FROM STDIN, psycopg 3 `cursor.copy()`, {} rows in 64 KiB writes".format(
            fnum(int(arg(r, "--rows")))), "MB/s", r, mb_per_sec, 1, False))
    r = rows_of("importer-bytea")
    if r:
        label = "{} MB bytea: INSERT as a parameter, SELECT back, bytes compared".format(arg(r, "--mb"))
        lines.append((label, "MB/s", r, lambda x: float(x["bytes"]) / 1e6 / float(x["seconds"])
                      if x["seconds"] else None, 1, False))
        lines.append(("", "s/round trip", r, ms_per_unit_s, 3, True))
    r = rows_of("importer-psycopg-pipeline")
    if r:
        label = "psycopg 3 pipeline of {} single-row INSERTs, then commit".format(
            fnum(int(arg(r, "--statements"))))
        lines.append((label, "ms/pipeline", r, ms_per_unit, 1, True))
    if not lines:
        return

    w("## Importer workloads")
    w("")
    w("What a bulk loader does, through the drivers' default settings ({}) unless a row "
      "says otherwise. Medians; the ratios are **speeds** whatever the unit: above 1 pgsidecar "
      "is faster (for ms or s per unit the ratio is inverted accordingly). Tables are unlogged "
      "and truncated directly before each run.".format(meta.get("importer_drivers", "")))
    w("")
    if meta.get("importer_sizes"):
        w("Sizes: {}.".format(meta["importer_sizes"]))
        w("")
    w("| workload | metric | direct | pgbouncer | pgsidecar | sidecar/bouncer | sidecar/direct |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for label, metric, rows, value, digits, lower in lines:
        cells = {t: Cell([x for x in rows if x["target"] == t], value) for t in TARGETS}
        w("| {} | {} | {} | {} | {} | {} | {} |".format(
            label, metric, cells["direct"].text(digits), cells["pgbouncer"].text(digits),
            cells["pgsidecar"].text(digits),
            speed_ratio(cells["pgsidecar"].median, cells["pgbouncer"].median, lower),
            speed_ratio(cells["pgsidecar"].median, cells["direct"].median, lower)))
    w("")

    if importer:
        w("Proxy CPU (utime+stime, all threads) per unit of work, over the whole driver run "
          "(connect included). Lower is better; 10 ms tick resolution.")
        w("")
        w("| workload | unit | pgbouncer | pgsidecar | sidecar/bouncer |")
        w("|---|---|---:|---:|---:|")

        def cpu_per_unit(r):
            if r["cpu_ticks"] in ("", None) or not r["units"]:
                return None
            return float(r["cpu_ticks"]) * 1e6 / float(r["clk_tck"]) / float(r["units"])

        for name in ordered(importer, "workload"):
            rows = rows_of(name)
            unit = next((x["unit"] for x in rows if x["unit"]), "run")
            unit = {"rows": "µs/row", "pipelines": "µs/pipeline", "round_trips": "µs/round trip"}.get(unit, "µs/" + unit)
            cells = {t: Cell([x for x in rows if x["target"] == t], cpu_per_unit) for t in POOLERS}
            w("| {} | {} | {} | {} | {} |".format(
                name, unit, cells["pgbouncer"].text(1), cells["pgsidecar"].text(1),
                ratio(cells["pgsidecar"].median, cells["pgbouncer"].median)))
        w("")
        w("Driver runs (`bench/importer.py --port PORT ...`):")
        w("")
        for name in ordered(importer, "workload"):
            w("- `{}`: `{}`".format(name, rows_of(name)[0]["args"]))
        w("")


def ms_per_unit_s(r):
    return float(r["seconds"]) / float(r["units"]) if r["seconds"] and r["units"] else None


def main():
    work = sys.argv[1]
    meta = {r["key"]: r["value"] for r in read_tsv(os.path.join(work, "meta.tsv"))}
    runs = read_tsv(os.path.join(work, "runs.tsv"))
    rss = read_tsv(os.path.join(work, "rss.tsv"))
    copy = read_tsv(os.path.join(work, "copy.tsv"))
    importer = read_tsv(os.path.join(work, "importer.tsv"))
    tls_census = read_tsv(os.path.join(work, "tls.tsv"))
    out = []
    w = out.append

    bouncer = meta.get("pgbouncer", "")
    old = meta.get("pgbouncer_old") == "1"
    if bouncer and not bouncer.startswith("skipped"):
        w("# pgsidecar vs PgBouncer {} vs direct".format(bouncer))
    else:
        w("# pgsidecar vs direct (PgBouncer {})".format(bouncer or "skipped"))
    w("")
    if old:
        w("> **WARNING: PgBouncer {} is older than {}.** This is not the headline comparison: "
          "old PgBouncer lacks features and fixes (before 1.21, prepared statements in "
          "transaction mode). Build 1.25.2 from source (bench/README.md) and rerun with "
          "`PGBOUNCER=/path/to/pgbouncer`.".format(bouncer, meta.get("pgbouncer_min", "1.25")))
        w("")
    duration, reps = int(meta.get("duration", "0")), int(meta.get("reps", "0"))
    if duration < 10 or reps < 3:
        w("> **Smoke run** (DURATION={}, REPS={}): checks that the harness works; the numbers "
          "are not a result.".format(duration, reps))
        w("")
    for key, label in (
        ("date", "date"),
        ("commit", "pgsidecar commit"),
        ("sidecar_bin", "pgsidecar binary"),
        ("cpu", "CPU"),
        ("nproc", "nproc"),
        ("kernel", "kernel"),
        ("loadavg", "load average at start"),
        ("postgres", "PostgreSQL"),
        ("pgbouncer", "PgBouncer"),
        ("pgbouncer_bin", "PgBouncer binary"),
        ("rustc", "rustc"),
        ("settings", "settings"),
        ("autogroup", "sched_autogroup_enabled"),
    ):
        if key in meta:
            w("- {}: {}".format(label, meta[key]))
    w("")
    w("Medians of {} repetition(s) of {} s each; in each repetition the three targets run "
      "back to back per scenario, so ratios compare runs made under the same machine load."
      .format(reps, duration))
    w("")

    tls = [r for r in runs if r["scenario"].startswith("tls-")]
    pgbench = [r for r in runs if not r["scenario"].startswith(("batch-", "tls-"))]
    batch = [r for r in runs if r["scenario"].startswith("batch-")]

    def table(rows, unit):
        scenarios = ordered(rows, "scenario")
        w("| scenario | direct | pgbouncer | pgsidecar | sidecar/bouncer | sidecar/direct |")
        w("|---|---:|---:|---:|---:|---:|")
        for s in scenarios:
            cells = {t: Cell([r for r in rows if r["scenario"] == s and r["target"] == t], tps) for t in TARGETS}
            w("| {} | {} | {} | {} | {} | {} |".format(
                s, cells["direct"].text(), cells["pgbouncer"].text(), cells["pgsidecar"].text(),
                ratio(cells["pgsidecar"].median, cells["pgbouncer"].median),
                ratio(cells["pgsidecar"].median, cells["direct"].median)))
        w("")
        w("Scenario arguments (all: `pgbench -n -j 2 -T {}`, {}):".format(duration, unit))
        w("")
        for s in scenarios:
            args = next(r["args"] for r in rows if r["scenario"] == s)
            w("- `{}`: `{}`".format(s, args))
        w("")

    def cpu_table(rows, what):
        w("| scenario | pgbouncer µs/{w} | pgsidecar µs/{w} | sidecar/bouncer |".format(w=what))
        w("|---|---:|---:|---:|")
        for s in ordered(rows, "scenario"):
            cells = {t: Cell([r for r in rows if r["scenario"] == s and r["target"] == t], cpu_us) for t in POOLERS}
            w("| {} | {} | {} | {} |".format(
                s, cells["pgbouncer"].text(1), cells["pgsidecar"].text(1),
                ratio(cells["pgsidecar"].median, cells["pgbouncer"].median)))
        w("")

    if pgbench:
        w("## Throughput (tps)")
        w("")
        table(pgbench, "tps as pgbench reports it")
        w("## Proxy CPU per transaction")
        w("")
        w("utime+stime of the proxy process (all threads) over the run, divided by the "
          "transactions pgbench completed. Lower is better.")
        w("")
        cpu_table(pgbench, "txn")

    if rss:
        w("## RSS per idle client")
        w("")
        w("Pooler VmRSS before and after N clients completed login and sat idle "
          "(fresh pooler process for each measurement).")
        w("")
        w("| clients | pgbouncer KiB/client | pgsidecar KiB/client | pgbouncer RSS before → after | pgsidecar RSS before → after |")
        w("|---:|---:|---:|---:|---:|")
        for n in ordered(rss, "clients"):
            per, span = {}, {}
            for t in POOLERS:
                rows = [r for r in rss if r["clients"] == n and r["target"] == t]
                if not rows:
                    per[t], span[t] = "skipped", ""
                elif rows[0]["status"] != "ok":
                    per[t], span[t] = "fail: " + rows[0]["reason"], ""
                else:
                    b, a = float(rows[0]["before_kib"]), float(rows[0]["after_kib"])
                    per[t] = fnum((a - b) / int(n), 1)
                    span[t] = "{} → {} MiB".format(fnum(b / 1024, 1), fnum(a / 1024, 1))
            w("| {} | {} | {} | {} | {} |".format(fnum(int(n)), per["pgbouncer"], per["pgsidecar"],
                                                 span["pgbouncer"], span["pgsidecar"]))
        w("")

    if copy:
        rows0 = copy[0]
        mb = float(rows0["bytes"]) / 1e6
        w("## COPY FROM STDIN ({} rows, {} MB, psql `\\copy` into an unlogged table)".format(
            fnum(int(rows0["rows"])), fnum(mb, 1)))
        w("")
        w("| target | MB/s | vs direct | proxy RSS before | proxy peak RSS during COPY |")
        w("|---|---:|---:|---:|---:|")

        def mbs(r):
            return float(r["bytes"]) / 1e6 / float(r["seconds"]) if r["seconds"] else None

        def kib(field):
            return lambda r: float(r[field]) if r[field] else None

        direct = Cell([r for r in copy if r["target"] == "direct"], mbs)
        for t in TARGETS:
            rows = [r for r in copy if r["target"] == t]
            if not rows:
                continue
            c = Cell(rows, mbs)
            if t == "direct":
                before, peak = "", ""
            else:
                b, p = Cell(rows, kib("rss_before_kib")), Cell(rows, kib("rss_peak_kib"))
                before = "{} MiB".format(fnum(b.median / 1024, 1)) if b.median else "n/a"
                # The worst repetition: memory must stay flat in every one.
                peak = "{} MiB".format(fnum(max(p.values) / 1024, 1)) if p.values else "n/a"
            w("| {} | {} | {} | {} | {} |".format(t, c.text(1), ratio(c.median, direct.median), before, peak))
        w("")

    if batch:
        w("## Batch insert (multi-row INSERT of 100 rows, 50 clients)")
        w("")
        w("| target | statements/s | rows/s | vs direct | proxy CPU µs/statement |")
        w("|---|---:|---:|---:|---:|")
        direct = Cell([r for r in batch if r["target"] == "direct"], tps)
        for t in TARGETS:
            rows = [r for r in batch if r["target"] == t]
            if not rows:
                continue
            c = Cell(rows, tps)
            cpu = Cell(rows, cpu_us).text(1) if t != "direct" else ""
            rows_s = fnum(c.median * 100) if c.median is not None else "n/a"
            w("| {} | {} | {} | {} | {} |".format(t, c.text(), rows_s, ratio(c.median, direct.median), cpu))
        w("")
        args = batch[0]["args"]
        w("`pgbench -n -j 2 -T {} {}`; sidecar/bouncer: {}".format(
            duration, args,
            ratio(Cell([r for r in batch if r["target"] == "pgsidecar"], tps).median,
                  Cell([r for r in batch if r["target"] == "pgbouncer"], tps).median)))
        w("")

    if importer or batch or copy:
        importer_section(w, meta, batch, copy, importer)

    if tls:
        w("## Upstream TLS (pooler → PostgreSQL over TLS)")
        w("")
        w("The same pgbench scenarios with the pooler's server connections over TLS; clients "
          "talk plaintext to the pooler, direct runs use libpq `PGSSLMODE` for reference. "
          "Both poolers were restarted with TLS to the server after the sections above; "
          "{}.".format(meta.get("tls_settings", "")))
        if meta.get("tls_server"):
            w("PostgreSQL `ssl`: {}.".format(meta["tls_server"]))
        w("")
        table(tls, "tps as pgbench reports it")

        plain = {r["scenario"]: r for r in pgbench}
        pairs = [s for s in ordered(tls, "scenario") if s[len("tls-"):] in plain]
        if pairs:
            w("TLS cost: tps with the upstream leg over TLS divided by tps of the plaintext "
              "scenario above (same run; 1.00 = free).")
            w("")
            w("| scenario | direct | pgbouncer | pgsidecar |")
            w("|---|---:|---:|---:|")
            for s in pairs:
                cols = []
                for t in TARGETS:
                    a = Cell([r for r in tls if r["scenario"] == s and r["target"] == t], tps).median
                    b = Cell([r for r in pgbench if r["scenario"] == s[4:] and r["target"] == t], tps).median
                    cols.append(ratio(a, b))
                w("| {} | {} | {} | {} |".format(s, *cols))
            w("")

        w("Proxy CPU per transaction over TLS (µs, lower is better):")
        w("")
        cpu_table(tls, "txn")

        if tls_census:
            w("Server side, after each pooler run: the pooler's own server connections (its "
              "sockets to PostgreSQL, found with `ss`, matched by client port in "
              "`pg_stat_activity`), TLS or not according to `pg_stat_ssl`, read directly:")
            w("")
            w("| pooler | runs checked | TLS server connections (min–max) | plaintext (max) | protocol, cipher |")
            w("|---|---:|---:|---:|---|")
            for t in POOLERS:
                rows = [r for r in tls_census if r["target"] == t]
                if not rows:
                    continue
                tl = [int(r["tls"]) for r in rows if r["tls"].isdigit()]
                pl = [int(r["plain"]) for r in rows if r["plain"].isdigit()]
                details = sorted({r["detail"] for r in rows if r["detail"]})
                verdict = "" if tl and min(tl) > 0 and pl and max(pl) == 0 else " **NOT all TLS**"
                w("| {} | {} | {} | {}{} | {} |".format(
                    t, len(rows), "{}–{}".format(min(tl), max(tl)) if tl else "n/a",
                    max(pl) if pl else "n/a", verdict, ", ".join(details) or "n/a"))
            w("")

    failures = [r for r in runs if r["status"] != "ok"]
    failures += [dict(r, scenario=r["workload"]) for r in importer if r["status"] != "ok"]
    failures += [dict(r, scenario="copy") for r in copy if r["status"] != "ok"]
    if failures:
        w("## Failed runs")
        w("")
        for r in failures:
            w("- {} rep {} {}: {}".format(r["scenario"], r["rep"], r["target"], r["reason"]))
        w("")

    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
