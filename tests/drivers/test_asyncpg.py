"""asyncpg through pgsidecar, with asyncpg's DEFAULT statement cache (named prepared
statements `__asyncpg_stmt_N__` on every query) - the classic transaction-pooling breaker.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import psycopg
import pytest

TASKS = 50
TOTAL_QUERIES = 10_000
PER_TASK = TOTAL_QUERIES // TASKS

PREPARED_ERRORS = ("prepared statement", "does not exist", "already exists", "portal")


async def connect(proxy, **kw):
    # No statement_cache_size argument on purpose: the default (100) is what users run.
    return await asyncpg.connect(proxy.url(), timeout=15, command_timeout=30, **kw)


async def _setup(proxy):
    conn = await connect(proxy)
    try:
        await conn.execute(
            """
            DROP TABLE IF EXISTS apg_items;
            DROP TYPE IF EXISTS apg_mood;
            CREATE TYPE apg_mood AS ENUM ('sad', 'ok', 'happy');
            CREATE TABLE apg_items (task int NOT NULL, i int NOT NULL, v text, mood apg_mood,
                                    PRIMARY KEY (task, i));
            CREATE TABLE IF NOT EXISTS apg_counters (task int PRIMARY KEY, n bigint NOT NULL);
            TRUNCATE apg_counters;
            """
        )
    finally:
        await conn.close()


async def _worker(proxy, task: int, errors: list, counts: dict):
    rnd = random.Random(task)
    conn = await connect(proxy)
    done = 0
    inserted = 0
    tx_count = 0
    moods = ["sad", "ok", "happy"]
    try:
        while done < PER_TASK:
            kind = rnd.randrange(8)
            try:
                if kind == 0:
                    n = rnd.randrange(1, 20)
                    rows = await conn.fetch(
                        "SELECT g, g * $1::int AS m FROM generate_series(1, $2::int) g", task, n)
                    assert [(r["g"], r["m"]) for r in rows] == [(g, g * task) for g in range(1, n + 1)]
                elif kind == 1:
                    a, b = rnd.randrange(1000), rnd.randrange(1000)
                    row = await conn.fetchrow("SELECT $1::text || '-' || $2::text AS s, $3::int + $4::int AS n",
                                              str(a), str(b), a, b)
                    assert row["s"] == f"{a}-{b}" and row["n"] == a + b
                elif kind == 2:
                    v = await conn.fetchval("SELECT $1::bigint * 2", task * 1_000_003 + done)
                    assert v == (task * 1_000_003 + done) * 2
                elif kind == 3:
                    status = await conn.execute(
                        "INSERT INTO apg_items (task, i, v, mood) VALUES ($1, $2, $3, $4)",
                        task, inserted, f"t{task}-{inserted}", moods[inserted % 3])
                    assert status == "INSERT 0 1"
                    inserted += 1
                elif kind == 4:
                    batch = [(task, inserted + j, f"t{task}-{inserted + j}", moods[(inserted + j) % 3])
                             for j in range(5)]
                    await conn.executemany(
                        "INSERT INTO apg_items (task, i, v, mood) VALUES ($1, $2, $3, $4)", batch)
                    inserted += 5
                elif kind == 5:
                    async with conn.transaction():
                        await conn.execute(
                            "INSERT INTO apg_counters (task, n) VALUES ($1, 1) "
                            "ON CONFLICT (task) DO UPDATE SET n = apg_counters.n + 1", task)
                        n = await conn.fetchval("SELECT n FROM apg_counters WHERE task = $1", task)
                        tx_count += 1
                        assert n == tx_count
                        cnt = await conn.fetchval("SELECT count(*) FROM apg_items WHERE task = $1", task)
                        assert cnt == inserted
                elif kind == 6:
                    # enum + array + json: makes asyncpg run its type introspection query
                    row = await conn.fetchrow(
                        "SELECT $1::apg_mood AS m, $2::int[] AS a, jsonb_build_object('k', $3::int)::text AS j",
                        moods[done % 3], [task, done], done)
                    assert row["m"] == moods[done % 3] and row["a"] == [task, done]
                    assert row["j"] == '{"k": %d}' % done
                else:
                    # a failing statement in the middle of the stream must not poison the cache
                    with pytest.raises(asyncpg.DivisionByZeroError):
                        await conn.fetchval("SELECT 1 / $1::int", 0)
            except AssertionError:
                raise
            except Exception as e:  # record everything, fail at the end with details
                errors.append(f"task {task} kind {kind}: {type(e).__name__}: {e}")
            done += 1
        counts[task] = (inserted, tx_count)
    finally:
        await conn.close()


async def test_asyncpg_default_statement_cache_stress(proxy, direct):
    await _setup(proxy)
    errors: list[str] = []
    counts: dict[int, tuple[int, int]] = {}

    # sample how many server connections the proxy really uses meanwhile
    max_backends = 0
    stop = asyncio.Event()

    async def sampler():
        nonlocal max_backends
        aconn = await psycopg.AsyncConnection.connect(direct(), autocommit=True)
        try:
            while not stop.is_set():
                cur = await aconn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
                    (proxy.dbname,))
                max_backends = max(max_backends, (await cur.fetchone())[0])
                await asyncio.sleep(0.05)
        finally:
            await aconn.close()

    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.wait_for(
            asyncio.gather(*(_worker(proxy, t, errors, counts) for t in range(TASKS))), timeout=60)
    finally:
        stop.set()
        await sampling

    prepared = [e for e in errors if any(s in e for s in PREPARED_ERRORS)]
    assert not prepared, f"{len(prepared)} prepared-statement errors, first: {prepared[:5]}"
    assert not errors, f"{len(errors)} errors, first: {errors[:5]}"
    assert len(counts) == TASKS

    conn = await connect(proxy)
    try:
        rows = await conn.fetch("SELECT task, count(*) AS c, max(i) AS mx FROM apg_items GROUP BY task")
        by_task = {r["task"]: (r["c"], r["mx"]) for r in rows}
        for task, (inserted, tx_count) in counts.items():
            if inserted:
                assert by_task[task] == (inserted, inserted - 1)
            else:
                assert task not in by_task
        tx_rows = dict(await conn.fetch("SELECT task, n FROM apg_counters"))
        assert {t: n for t, n in tx_rows.items()} == {t: c[1] for t, c in counts.items() if c[1]}
    finally:
        await conn.close()
    print(f"\n[{proxy.mode}] max server connections seen: {max_backends}")
    assert 1 <= max_backends <= proxy.pool_size, f"{max_backends} server connections for pool size {proxy.pool_size}"


async def test_asyncpg_explicit_prepare_across_transactions(proxy):
    conn = await connect(proxy)
    other = await connect(proxy)
    try:
        stmt = await conn.prepare("SELECT $1::int * 3 AS x, current_database() AS d")
        for i in range(50):
            # the other client keeps the pool busy so conn lands on different servers
            await other.fetchval("SELECT $1::int", i)
            row = await stmt.fetchrow(i)
            assert row["x"] == i * 3 and row["d"] == proxy.dbname
        assert [r["x"] for r in await stmt.fetch(7)] == [21]
        # cursor (portal) inside a transaction
        async with conn.transaction():
            got = [r[0] async for r in conn.cursor("SELECT g FROM generate_series(1, 1000) g", prefetch=100)]
            assert got == list(range(1, 1001))
    finally:
        await conn.close()
        await other.close()


async def test_asyncpg_copy_and_pool(proxy):
    # In session mode every pooled client connection holds a server connection for its
    # whole life: a client-side pool larger than the proxy's pool waits for ever.
    max_size = 10 if proxy.mode == "transaction" else proxy.pool_size
    pool = await asyncpg.create_pool(proxy.url(), min_size=2, max_size=max_size, timeout=15, command_timeout=30)
    try:
        await pool.execute("DROP TABLE IF EXISTS apg_copy; CREATE TABLE apg_copy (a int, b text)")
        records = [(i, f"r{i}") for i in range(20_000)]
        async with pool.acquire() as conn:
            await conn.copy_records_to_table("apg_copy", records=records)

        async def one(i):
            return await pool.fetchval("SELECT b FROM apg_copy WHERE a = $1", i)

        got = await asyncio.gather(*(one(i) for i in range(0, 20_000, 97)))
        assert got == [f"r{i}" for i in range(0, 20_000, 97)]
        assert await pool.fetchval("SELECT sum(a) FROM apg_copy") == sum(range(20_000))
    finally:
        await pool.close()


async def test_asyncpg_command_timeout_cancels_and_recovers(proxy):
    """asyncpg's timeout= sends a CancelRequest (through the proxy) and keeps the
    connection; the statement cache must survive it."""
    conn = await connect(proxy)
    other = await connect(proxy)
    try:
        for i in range(3):
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(5)", timeout=0.3)
            assert asyncio.get_running_loop().time() - t0 < 3
            # Let a cancel still in flight land while the server is idle: through pgsidecar
            # it can otherwise cancel the next statement (test_cancel.py covers that race).
            await asyncio.sleep(0.1)
            # the server really stopped (else it would still be busy for the other client)
            assert await other.fetchval("SELECT $1::int + 1", i) == i + 1
            assert await conn.fetchval("SELECT $1::int * 2", i) == i * 2
        async with conn.transaction(isolation="serializable", readonly=True):
            assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
    finally:
        await conn.close()
        await other.close()
