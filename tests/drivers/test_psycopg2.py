"""psycopg2 through pgsidecar: executemany, execute_values, errors and recovery, named
(server-side) cursors."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest

ROWS = 10_000


def connect(proxy, **kw):
    return psycopg2.connect(proxy.dsn(**kw))


def recreate(conn, table: str, cols: str) -> None:
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} ({cols})")
    conn.commit()


def test_executemany_and_execute_values(proxy):
    conn = connect(proxy)
    try:
        recreate(conn, "pg2_rows", "id int PRIMARY KEY, v text, src text")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO pg2_rows VALUES (%s, %s, 'many')", [(i, f"v{i}") for i in range(ROWS)])
            assert cur.rowcount == ROWS
        conn.commit()
        with conn.cursor() as cur:
            psycopg2.extras.execute_values(
                cur, "INSERT INTO pg2_rows VALUES %s",
                [(ROWS + i, f"v{ROWS + i}", "values") for i in range(ROWS)], page_size=1000)
            returned = psycopg2.extras.execute_values(
                cur, "UPDATE pg2_rows SET v = data.v FROM (VALUES %s) AS data (id, v) "
                     "WHERE pg2_rows.id = data.id RETURNING pg2_rows.id",
                [(i, f"w{i}") for i in range(0, 2 * ROWS, 100)], fetch=True)
            assert sorted(r[0] for r in returned) == list(range(0, 2 * ROWS, 100))
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("SELECT src, count(*), sum(id), count(*) FILTER (WHERE v LIKE 'w%%') "
                        "FROM pg2_rows GROUP BY src ORDER BY src")
            assert cur.fetchall() == [
                ("many", ROWS, sum(range(ROWS)), ROWS // 100),
                ("values", ROWS, sum(range(ROWS, 2 * ROWS)), ROWS // 100),
            ]
        conn.rollback()
    finally:
        conn.close()


def test_error_and_recovery(proxy):
    conn = connect(proxy)
    try:
        recreate(conn, "pg2_err", "id int PRIMARY KEY")
        cur = conn.cursor()
        cur.execute("INSERT INTO pg2_err VALUES (1)")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute("INSERT INTO pg2_err VALUES (1)")
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            cur.execute("SELECT 1")
        conn.rollback()
        cur.execute("SELECT count(*) FROM pg2_err")
        assert cur.fetchone() == (0,)
        conn.rollback()

        # an error in a multi-statement simple query: nothing of it is kept
        conn.autocommit = True
        with pytest.raises(psycopg2.errors.DivisionByZero):
            cur.execute("INSERT INTO pg2_err VALUES (10); SELECT 1/0; INSERT INTO pg2_err VALUES (11)")
        cur.execute("SELECT count(*) FROM pg2_err")
        assert cur.fetchone() == (0,)
        with pytest.raises(psycopg2.errors.UndefinedTable):
            cur.execute("SELECT * FROM pg2_no_such_table")
        cur.execute("INSERT INTO pg2_err VALUES (2) RETURNING id")
        assert cur.fetchone() == (2,)
        # the statement-level error did not break later transactions
        conn.autocommit = False
        cur.execute("INSERT INTO pg2_err VALUES (3)")
        conn.commit()
        cur.execute("SELECT array_agg(id ORDER BY id) FROM pg2_err")
        assert cur.fetchone() == ([2, 3],)
        conn.rollback()
    finally:
        conn.close()


def test_named_cursor_in_transaction(proxy):
    """A psycopg2 named cursor lives inside the transaction psycopg2 opens: fine in
    both modes (the server connection is held until COMMIT)."""
    conn = connect(proxy)
    other = connect(proxy)
    try:
        with conn.cursor(name="pg2_named") as cur:
            cur.itersize = 1000
            cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
            n = 0
            for g, h in cur:
                n += 1
                assert g == n
                if n % 5000 == 0:  # other clients keep using the pool meanwhile
                    with other.cursor() as oc:
                        oc.execute("SELECT %s", (n,))
                        assert oc.fetchone() == (n,)
                    other.commit()
            assert n == 20000
        conn.commit()
    finally:
        conn.close()
        other.close()


def test_named_cursor_withhold_session_mode(session_proxy):
    """WITH HOLD named cursor read across commits: only in session mode."""
    conn = connect(session_proxy)
    try:
        cur = conn.cursor(name="pg2_hold", withhold=True)
        cur.itersize = 100
        cur.execute("SELECT g FROM generate_series(1, 1000) g")
        conn.commit()
        got = [r[0] for r in cur.fetchmany(300)]
        conn.commit()
        got += [r[0] for r in cur]
        assert got == list(range(1, 1001))
        cur.close()
        conn.commit()
    finally:
        conn.close()
