"""Worker-concurrency importer, like our first user: N threads with psycopg (sync), each
importing batches in transactions - COPY the raw batch into a log table, then
executemany upserts (INSERT ... ON CONFLICT DO UPDATE) into one shared table - then
exact row counts and sums."""

from __future__ import annotations

import random
import threading

import psycopg

THREADS = 20
BATCHES = 10
COPY_ROWS = 1000
UPSERTS = 100
KEYS = 1000  # shared key space: threads collide on the same rows


def _plan(worker: int, batch: int):
    rnd = random.Random(worker * 1000 + batch)
    log = [(worker, batch, j, rnd.randrange(1, 1000)) for j in range(COPY_ROWS)]
    # sorted keys: every transaction locks rows in the same order, so no deadlocks
    keys = sorted(rnd.sample(range(KEYS), UPSERTS))
    ups = [(k, rnd.randrange(1, 100)) for k in keys]
    return log, ups


def test_importer_threads(proxy):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS imp_log, imp_totals")
        conn.execute("CREATE TABLE imp_log (worker int, batch int, j int, v int, PRIMARY KEY (worker, batch, j))")
        conn.execute("CREATE TABLE imp_totals (k int PRIMARY KEY, cnt int NOT NULL, total bigint NOT NULL)")

    errors: list[str] = []
    barrier = threading.Barrier(THREADS)

    def worker(w: int):
        try:
            # In session mode only pool_size clients are served at a time; the others wait
            # in the proxy's queue, so don't start everyone at once on a barrier there.
            if proxy.mode == "transaction":
                barrier.wait(timeout=30)
            with psycopg.connect(proxy.dsn(application_name=f"importer-{w}")) as conn:
                for b in range(BATCHES):
                    log, ups = _plan(w, b)
                    with conn.transaction():
                        with conn.cursor() as cur:
                            with cur.copy("COPY imp_log (worker, batch, j, v) FROM STDIN") as copy:
                                for r in log:
                                    copy.write_row(r)
                            cur.executemany(
                                "INSERT INTO imp_totals (k, cnt, total) VALUES (%s, 1, %s) "
                                "ON CONFLICT (k) DO UPDATE SET cnt = imp_totals.cnt + 1, "
                                "total = imp_totals.total + EXCLUDED.total",
                                ups)
                    conn.commit()
        except Exception as e:  # noqa: BLE001 - reported below with the worker id
            errors.append(f"worker {w}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "importer threads hung"
    assert not errors, errors[:5]

    exp_log_rows = exp_log_sum = exp_cnt = exp_total = 0
    exp_keys = set()
    for w in range(THREADS):
        for b in range(BATCHES):
            log, ups = _plan(w, b)
            exp_log_rows += len(log)
            exp_log_sum += sum(r[3] for r in log)
            exp_cnt += len(ups)
            exp_total += sum(u[1] for u in ups)
            exp_keys.update(u[0] for u in ups)

    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*), sum(v) FROM imp_log").fetchone() == (exp_log_rows, exp_log_sum)
        assert conn.execute("SELECT count(*), sum(cnt), sum(total) FROM imp_totals").fetchone() == \
            (len(exp_keys), exp_cnt, exp_total)
        per_worker = conn.execute("SELECT count(DISTINCT worker), min(c), max(c) FROM "
                                  "(SELECT worker, count(*) c FROM imp_log GROUP BY worker) s").fetchone()
        assert per_worker == (THREADS, BATCHES * COPY_ROWS, BATCHES * COPY_ROWS)
