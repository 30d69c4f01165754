#!/usr/bin/env python3
"""Importer workloads for bench/run.sh: what a bulk loader does, through real drivers.

    python bench/importer.py --port PORT --workload NAME [--rows N ...]

Runs one workload against 127.0.0.1:PORT as user postgres, database postgres, with the
driver's defaults (psycopg 3: prepare_threshold=5; asyncpg: statement_cache_size=100),
unless the workload name says otherwise. The tables are created by run.sh and truncated
directly (not through the pooler) before each run; every workload checks what it wrote.

On success prints one line on stdout, key=value pairs separated by spaces:

    RESULT workload=NAME seconds=S units=N unit=WHAT bytes=B table=T rows=R

seconds is the timed part only (after connecting, data generated beforehand), units the
count the rate is computed from (rows, pipelines, round trips), table/rows what run.sh
should find in the table afterwards (checked directly on the cluster). On failure prints
a one-line reason on stderr and exits 1.

Workloads:
  psycopg-executemany   --repeat transactions, each one cursor.executemany() of --rows
                        INSERTs, then commit (psycopg >= 3.1 pipelines executemany)
  asyncpg-executemany   --repeat transactions, each one connection.executemany() of --rows
                        INSERTs
  asyncpg-executemany-nocache
                        the same with statement_cache_size=0, as many PgBouncer users run
  psycopg-copy          cursor.copy("COPY ... FROM STDIN") of --rows text rows, written in
                        64 KiB chunks (the psql \\copy file format: int, md5, md5, md5)
  bytea                 --repeat times: INSERT one --mb MB random bytea parameter, SELECT
                        it back, compare the bytes
  psycopg-pipeline      --repeat times: `with conn.pipeline():` --statements single-row
                        INSERTs, then commit
"""

import argparse
import asyncio
import datetime
import hashlib
import os
import sys
import time

INSERT_PG = "INSERT INTO bench_import (id, name, qty, created) VALUES (%s, %s, %s, %s)"
INSERT_APG = "INSERT INTO bench_import (id, name, qty, created) VALUES ($1, $2, $3, $4)"


class Failure(Exception):
    pass


def import_rows(n, start=1):
    """n rows of (bigint, ~40-byte text, int, timestamptz)."""
    t0 = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    return [
        (i, "customer {:08d} abcdefghijklmnopqrstu".format(i), i % 1000, t0 + datetime.timedelta(seconds=i))
        for i in range(start, start + n)
    ]


def batches(args):
    """--repeat transactions of --rows rows each."""
    return [import_rows(args.rows, 1 + k * args.rows) for k in range(args.repeat)]


def conninfo(port):
    return "host=127.0.0.1 port={} user=postgres dbname=postgres application_name=bench-importer".format(port)


def expect(what, got, want):
    if got != want:
        raise Failure("{}: got {!r}, expected {!r}".format(what, got, want))


# --- psycopg 3 ---------------------------------------------------------------------------


def psycopg_executemany(args):
    import psycopg

    txns = batches(args)
    times = []
    with psycopg.connect(conninfo(args.port)) as conn:
        for rows in txns:
            t0 = time.perf_counter()
            with conn.cursor() as cur:
                cur.executemany(INSERT_PG, rows)
            conn.commit()
            times.append(time.perf_counter() - t0)
        n = conn.execute("SELECT count(*) FROM bench_import").fetchone()[0]
    want = args.rows * args.repeat
    expect("rows in bench_import", n, want)
    return dict(seconds=sum(times), units=want, unit="rows", table="bench_import", rows=want, best=min(times))


def copy_chunks(n, size=65536):
    out, buf, length = [], [], 0
    for i in range(1, n + 1):
        line = "{}\t{}\t{}\t{}\n".format(
            i,
            hashlib.md5(str(i).encode()).hexdigest(),
            hashlib.md5(str(i + 1).encode()).hexdigest(),
            hashlib.md5(str(i + 2).encode()).hexdigest(),
        ).encode()
        buf.append(line)
        length += len(line)
        if length >= size:
            out.append(b"".join(buf))
            buf, length = [], 0
    if buf:
        out.append(b"".join(buf))
    return out


def psycopg_copy(args):
    import psycopg

    chunks = copy_chunks(args.rows)
    nbytes = sum(len(c) for c in chunks)
    with psycopg.connect(conninfo(args.port)) as conn:
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            with cur.copy("COPY bench_copy (id, a, b, c) FROM STDIN") as copy:
                for c in chunks:
                    copy.write(c)
            copied = cur.rowcount
        conn.commit()
        secs = time.perf_counter() - t0
    expect("COPY row count", copied, args.rows)
    return dict(seconds=secs, units=args.rows, unit="rows", bytes=nbytes, table="bench_copy", rows=args.rows)


def bytea(args):
    import psycopg

    size = int(args.mb * 1000 * 1000)
    payload = os.urandom(size)
    digest = hashlib.sha256(payload).hexdigest()
    times = []
    with psycopg.connect(conninfo(args.port), autocommit=True) as conn:
        for i in range(1, args.repeat + 1):
            t0 = time.perf_counter()
            conn.execute("INSERT INTO bench_blob (id, data) VALUES (%s, %s)", (i, payload))
            got = conn.execute("SELECT data FROM bench_blob WHERE id = %s", (i,)).fetchone()[0]
            times.append(time.perf_counter() - t0)
            got = bytes(got)
            if len(got) != size or got != payload:
                raise Failure("round trip {}: got {} bytes back (sha256 {}), sent {} (sha256 {})".format(
                    i, len(got), hashlib.sha256(got).hexdigest()[:16], size, digest[:16]))
            del got
        n, total = conn.execute("SELECT count(*), sum(length(data)) FROM bench_blob").fetchone()
    expect("rows in bench_blob", n, args.repeat)
    expect("bytes in bench_blob", int(total), size * args.repeat)
    return dict(seconds=sum(times), units=args.repeat, unit="round_trips", bytes=size * args.repeat,
                table="bench_blob", rows=args.repeat, best=min(times))


def psycopg_pipeline(args):
    import psycopg

    t_base = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    times = []
    with psycopg.connect(conninfo(args.port)) as conn:
        if not psycopg.Pipeline.is_supported():
            raise Failure("this libpq has no pipeline mode")
        k = 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            with conn.pipeline():
                with conn.cursor() as cur:
                    for _ in range(args.statements):
                        k += 1
                        cur.execute(INSERT_PG, (k, "p", k % 1000, t_base))
            conn.commit()
            times.append(time.perf_counter() - t0)
        n = conn.execute("SELECT count(*) FROM bench_import").fetchone()[0]
    want = args.repeat * args.statements
    expect("rows in bench_import", n, want)
    return dict(seconds=sum(times), units=args.repeat, unit="pipelines", statements=want,
                table="bench_import", rows=want, best=min(times))


# --- asyncpg -----------------------------------------------------------------------------


def asyncpg_executemany(args, cache=True):
    import asyncpg

    txns = batches(args)

    async def run():
        kw = {} if cache else {"statement_cache_size": 0}
        conn = await asyncpg.connect(host="127.0.0.1", port=args.port, user="postgres", database="postgres",
                                     ssl=False, server_settings={"application_name": "bench-importer"}, **kw)
        times = []
        try:
            for rows in txns:
                t0 = time.perf_counter()
                async with conn.transaction():
                    await conn.executemany(INSERT_APG, rows)
                times.append(time.perf_counter() - t0)
            n = await conn.fetchval("SELECT count(*) FROM bench_import")
        finally:
            await conn.close()
        return times, n

    times, n = asyncio.run(run())
    want = args.rows * args.repeat
    expect("rows in bench_import", n, want)
    return dict(seconds=sum(times), units=want, unit="rows", table="bench_import", rows=want, best=min(times))


WORKLOADS = {
    "psycopg-executemany": psycopg_executemany,
    "asyncpg-executemany": asyncpg_executemany,
    "asyncpg-executemany-nocache": lambda a: asyncpg_executemany(a, cache=False),
    "psycopg-copy": psycopg_copy,
    "bytea": bytea,
    "psycopg-pipeline": psycopg_pipeline,
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    p.add_argument("--rows", type=int, default=20000, help="rows (executemany, copy)")
    p.add_argument("--mb", type=float, default=20, help="bytea size in MB (10^6 bytes)")
    p.add_argument("--repeat", type=int, default=5,
                   help="transactions (executemany), round trips (bytea) or pipelines (pipeline)")
    p.add_argument("--statements", type=int, default=1000, help="statements per pipeline")
    args = p.parse_args()
    try:
        res = WORKLOADS[args.workload](args)
    except Failure as e:
        print("{}: {}".format(args.workload, e), file=sys.stderr)
        return 1
    except Exception as e:  # driver errors: the reason goes into the report
        msg = " ".join(str(e).split())
        print("{}: {}: {}".format(args.workload, type(e).__name__, msg), file=sys.stderr)
        return 1
    res.setdefault("bytes", 0)
    fields = ["workload=" + args.workload]
    for k, v in res.items():
        fields.append("{}={}".format(k, "{:.6f}".format(v) if isinstance(v, float) else v))
    print("RESULT " + " ".join(fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
