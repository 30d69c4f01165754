"""psycopg 3 (sync and async) through pgsidecar: server-side prepared statements
(prepare_threshold), pipeline mode, executemany, COPY, transactions."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from psycopg import errors as E
from psycopg.rows import dict_row

COPY_ROWS = 100_000


def connect(proxy, **kw) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), **kw)


async def aconnect(proxy, **kw) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(proxy.dsn(), **kw)


def recreate(conn, table: str, cols: str) -> None:
    with conn.transaction():
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} ({cols})")


async def arecreate(conn, table: str, cols: str) -> None:
    async with conn.transaction():
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} ({cols})")


# ---------------------------------------------------------------------------
# prepared statements
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0, None], ids=["threshold0", "default-threshold"])
def test_prepared_statements_sync(proxy, threshold):
    kw = {} if threshold is None else {"prepare_threshold": threshold}
    # a second client keeps the pool busy so statements land on several servers
    with connect(proxy, autocommit=True, **kw) as conn, connect(proxy, autocommit=True) as other:
        for i in range(40):
            other.execute("SELECT %s::int", (i,))
            row = conn.execute("SELECT %s::int * 2, %s::text || 'x'", (i, str(i))).fetchone()
            assert row == (i * 2, f"{i}x")
            # same text, inside an explicit transaction
            with conn.transaction():
                assert conn.execute("SELECT %s::int * 2, %s::text || 'x'", (i, "t")).fetchone() == (i * 2, "tx")
        # explicit prepare=True on a one-off statement
        assert conn.execute("SELECT 41 + %s::int", (1,), prepare=True).fetchone() == (42,)


def test_prepared_statement_eviction_sync(proxy):
    """More distinct statements than psycopg's prepared_max: psycopg deallocates old ones."""
    with connect(proxy, autocommit=True, prepare_threshold=0) as conn:
        conn.prepared_max = 5
        for rnd in range(3):
            for q in range(20):
                got = conn.execute(f"SELECT %s::int + {q}", (rnd,)).fetchone()
                assert got == (rnd + q,)
        # still healthy, with fresh statements and re-prepared old ones
        for q in range(20):
            assert conn.execute(f"SELECT %s::int + {q}", (100,)).fetchone() == (100 + q,)


async def test_prepared_statements_async(proxy):
    async with await aconnect(proxy, autocommit=True, prepare_threshold=0) as conn, \
            await aconnect(proxy, autocommit=True) as other:
        for i in range(40):
            await other.execute("SELECT %s::int", (i,))
            cur = await conn.execute("SELECT %s::int * 3", (i,))
            assert await cur.fetchone() == (i * 3,)
        # the same statement from many concurrent connections
        conns = [await aconnect(proxy, autocommit=True, prepare_threshold=0) for _ in range(proxy.pool_size - 2)]
        try:
            async def run(c, k):
                for j in range(30):
                    cur = await c.execute("SELECT %s::int * 3 + %s::int", (k, j))
                    assert await cur.fetchone() == (k * 3 + j,)
            await asyncio.wait_for(asyncio.gather(*(run(c, k) for k, c in enumerate(conns))), 30)
        finally:
            for c in conns:
                await c.close()


# ---------------------------------------------------------------------------
# pipeline mode
# ---------------------------------------------------------------------------


def test_pipeline_sync(proxy):
    with connect(proxy, autocommit=True) as conn:
        recreate(conn, "p3_pipe", "id int PRIMARY KEY, v text")
        with conn.pipeline():
            for i in range(500):
                conn.execute("INSERT INTO p3_pipe VALUES (%s, %s)", (i, f"v{i}"))
            cur = conn.execute("SELECT count(*), sum(id) FROM p3_pipe")
        assert cur.fetchone() == (500, sum(range(500)))

        # error inside a pipeline: the whole implicit transaction up to the sync is lost
        with pytest.raises(E.UniqueViolation):
            with conn.pipeline():
                conn.execute("INSERT INTO p3_pipe VALUES (1000, 'lost')")
                conn.execute("INSERT INTO p3_pipe VALUES (1, 'dup')")
                conn.execute("INSERT INTO p3_pipe VALUES (1001, 'lost too')")
        assert conn.execute("SELECT count(*) FROM p3_pipe WHERE id >= 1000").fetchone() == (0,)

        # explicit sync points: work before the sync survives the later error
        with pytest.raises(E.DivisionByZero):
            with conn.pipeline() as p:
                conn.execute("INSERT INTO p3_pipe VALUES (2000, 'kept')")
                p.sync()
                conn.execute("SELECT 1 / 0")
                conn.execute("INSERT INTO p3_pipe VALUES (2001, 'skipped')")
        assert conn.execute("SELECT array_agg(id ORDER BY id) FROM p3_pipe WHERE id >= 1000").fetchone() == ([2000],)

        # recovered: a new pipeline works
        with conn.pipeline():
            cur1 = conn.execute("SELECT 1")
            cur2 = conn.execute("SELECT count(*) FROM p3_pipe")
        assert cur1.fetchone() == (1,) and cur2.fetchone() == (501,)


def test_pipeline_in_transaction_sync(proxy):
    with connect(proxy) as conn:  # not autocommit: psycopg BEGINs
        recreate(conn, "p3_pipe_tx", "id int PRIMARY KEY")
        conn.commit()
        with conn.pipeline():
            for i in range(100):
                conn.execute("INSERT INTO p3_pipe_tx VALUES (%s)", (i,))
        conn.commit()
        with pytest.raises(E.UniqueViolation):
            with conn.pipeline():
                conn.execute("INSERT INTO p3_pipe_tx VALUES (500)")
                conn.execute("INSERT INTO p3_pipe_tx VALUES (5)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*), max(id) FROM p3_pipe_tx").fetchone() == (100, 99)
        conn.rollback()


async def test_pipeline_async(proxy):
    async with await aconnect(proxy, autocommit=True) as conn:
        await arecreate(conn, "p3a_pipe", "id int PRIMARY KEY, v text")
        async with conn.pipeline():
            for i in range(500):
                await conn.execute("INSERT INTO p3a_pipe VALUES (%s, %s)", (i, f"v{i}"))
            cur = await conn.execute("SELECT count(*), sum(id) FROM p3a_pipe")
        assert await cur.fetchone() == (500, sum(range(500)))
        with pytest.raises(E.UniqueViolation):
            async with conn.pipeline():
                await conn.execute("INSERT INTO p3a_pipe VALUES (1000, 'lost')")
                await conn.execute("INSERT INTO p3a_pipe VALUES (1, 'dup')")
        cur = await conn.execute("SELECT count(*) FROM p3a_pipe")
        assert await cur.fetchone() == (500,)


# ---------------------------------------------------------------------------
# executemany
# ---------------------------------------------------------------------------


def test_executemany_sync(proxy):
    with connect(proxy) as conn:
        recreate(conn, "p3_many", "id int PRIMARY KEY, v text")
        rows = [(i, f"v{i}") for i in range(5000)]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO p3_many VALUES (%s, %s)", rows)
            cur.executemany("UPDATE p3_many SET v = v || '!' WHERE id = %s RETURNING id", [(i,) for i in range(10)],
                            returning=True)
            ids = []
            while True:
                ids.append(cur.fetchone()[0])
                if not cur.nextset():
                    break
            assert ids == list(range(10))
        conn.commit()
        assert conn.execute("SELECT count(*), sum(id), count(*) FILTER (WHERE v LIKE '%!') FROM p3_many").fetchone() \
            == (5000, sum(range(5000)), 10)
        conn.commit()


async def test_executemany_async(proxy):
    async with await aconnect(proxy) as conn:
        await arecreate(conn, "p3a_many", "id int PRIMARY KEY, v text")
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO p3a_many VALUES (%s, %s)", [(i, f"v{i}") for i in range(5000)])
        await conn.commit()
        cur = await conn.execute("SELECT count(*), sum(id) FROM p3a_many")
        assert await cur.fetchone() == (5000, sum(range(5000)))
        await conn.commit()


# ---------------------------------------------------------------------------
# COPY
# ---------------------------------------------------------------------------


def _rows():
    return [(i, f"row {i}\ttab\\slash", i * 0.5 if i % 7 else None) for i in range(COPY_ROWS)]


def test_copy_sync(proxy):
    rows = _rows()
    with connect(proxy) as conn:
        recreate(conn, "p3_copy", "id int, t text, f float8")
        conn.commit()
        with conn.cursor() as cur:
            with cur.copy("COPY p3_copy (id, t, f) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
        conn.commit()
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT id, t, f FROM p3_copy ORDER BY id) TO STDOUT") as copy:
                copy.set_types(["int4", "text", "float8"])
                back = list(copy.rows())
        conn.commit()
        assert back == rows

        # binary format, and a COPY that fails half way is rolled back and the conn recovers
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT id, t FROM p3_copy WHERE id < 1000 ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                assert list(copy.rows()) == [(r[0], r[1]) for r in rows[:1000]]
        conn.commit()
        with pytest.raises(E.InvalidTextRepresentation):
            with conn.cursor() as cur:
                with cur.copy("COPY p3_copy (id, t) FROM STDIN") as copy:
                    copy.write(b"1\tok\nnot-a-number\tbad\n")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM p3_copy").fetchone() == (COPY_ROWS,)
        conn.rollback()


async def test_copy_async(proxy):
    rows = _rows()
    async with await aconnect(proxy, autocommit=True) as conn:
        await arecreate(conn, "p3a_copy", "id int, t text, f float8")
        async with conn.cursor() as cur:
            async with cur.copy("COPY p3a_copy (id, t, f) FROM STDIN") as copy:
                for r in rows:
                    await copy.write_row(r)
        async with conn.cursor() as cur:
            async with cur.copy("COPY (SELECT id, t, f FROM p3a_copy ORDER BY id) TO STDOUT") as copy:
                copy.set_types(["int4", "text", "float8"])
                back = [r async for r in copy.rows()]
        assert back == rows


# ---------------------------------------------------------------------------
# transactions
# ---------------------------------------------------------------------------


def test_transactions_rollback_sync(proxy):
    with connect(proxy, autocommit=True) as conn:
        recreate(conn, "p3_tx", "id int PRIMARY KEY")

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            with conn.transaction():
                conn.execute("INSERT INTO p3_tx VALUES (1)")
                raise Boom
        with conn.transaction():
            conn.execute("INSERT INTO p3_tx VALUES (2)")
            with pytest.raises(Boom):
                with conn.transaction():  # savepoint
                    conn.execute("INSERT INTO p3_tx VALUES (3)")
                    raise Boom
            with pytest.raises(E.UniqueViolation):
                with conn.transaction():
                    conn.execute("INSERT INTO p3_tx VALUES (2)")
            conn.execute("INSERT INTO p3_tx VALUES (4)")
        assert [r[0] for r in conn.execute("SELECT id FROM p3_tx ORDER BY id")] == [2, 4]

    with connect(proxy) as conn:
        conn.execute("INSERT INTO p3_tx VALUES (5)")
        conn.rollback()
        conn.execute("INSERT INTO p3_tx VALUES (6)")
        with pytest.raises(E.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(E.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert [r[0] for r in conn.execute("SELECT id FROM p3_tx ORDER BY id")] == [2, 4]
        conn.rollback()


def test_server_side_cursor_in_transaction_sync(proxy):
    with connect(proxy) as conn:
        with conn.cursor(name="p3_named", row_factory=dict_row) as cur:
            cur.itersize = 500
            cur.execute("SELECT g AS n FROM generate_series(1, 5000) g")
            assert [r["n"] for r in cur] == list(range(1, 5001))
        conn.commit()


async def test_transactions_rollback_async(proxy):
    async with await aconnect(proxy, autocommit=True) as conn:
        await arecreate(conn, "p3a_tx", "id int PRIMARY KEY")
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute("INSERT INTO p3a_tx VALUES (1)")
                1 / 0
        async with conn.transaction():
            await conn.execute("INSERT INTO p3a_tx VALUES (2)")
            with pytest.raises(E.UniqueViolation):
                async with conn.transaction():
                    await conn.execute("INSERT INTO p3a_tx VALUES (2)")
        cur = await conn.execute("SELECT array_agg(id) FROM p3a_tx")
        assert await cur.fetchone() == ([2],)


# ---------------------------------------------------------------------------
# cancellation and timeouts
# ---------------------------------------------------------------------------


def test_cancel_from_other_thread_sync(proxy):
    import threading

    with connect(proxy, autocommit=True, prepare_threshold=0) as conn:
        for _ in range(2):
            timer = threading.Timer(0.3, conn.cancel_safe)
            timer.start()
            try:
                with pytest.raises(E.QueryCanceled):
                    conn.execute("SELECT pg_sleep(5)")
            finally:
                timer.cancel()
            time.sleep(0.1)  # see test_cancel.py: a late cancel could zap the next statement
            assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)


def test_statement_timeout_from_startup_options(proxy):
    with connect(proxy, autocommit=True, options="-c statement_timeout=300") as conn, \
            connect(proxy, autocommit=True) as other:
        for _ in range(3):
            with pytest.raises(E.QueryCanceled):
                conn.execute("SELECT pg_sleep(3)")
            # the other client does not inherit it
            assert other.execute("SHOW statement_timeout").fetchone() == ("0",)
            other.execute("SELECT pg_sleep(0.4)")
        assert conn.execute("SHOW statement_timeout").fetchone() == ("300ms",)


def test_pipeline_with_prepared_statements_sync(proxy):
    with connect(proxy, autocommit=True, prepare_threshold=0) as conn:
        for rnd in range(3):
            with conn.pipeline():
                curs = [conn.execute("SELECT %s::int + %s::int", (rnd, i)) for i in range(50)]
            assert [c.fetchone()[0] for c in curs] == [rnd + i for i in range(50)]
