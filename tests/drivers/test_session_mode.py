"""Features that need the client to keep ONE server connection across transactions:
supported in session mode (tested here), not in transaction mode (see MATRIX.md)."""

from __future__ import annotations

import time

import psycopg
import psycopg2
import pytest


def connect(proxy, **kw):
    return psycopg.connect(proxy.dsn(), autocommit=True, **kw)


def test_advisory_locks(session_proxy):
    with connect(session_proxy) as a, connect(session_proxy) as b:
        a.execute("SELECT pg_advisory_lock(4242)")
        # held across statements/transactions of a, visible to b
        for _ in range(3):
            with a.transaction():
                a.execute("SELECT 1")
            assert b.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (False,)
        assert a.execute("SELECT pg_advisory_unlock(4242)").fetchone() == (True,)
        assert b.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)
        assert b.execute("SELECT pg_advisory_unlock(4242)").fetchone() == (True,)


def test_advisory_lock_released_on_disconnect(session_proxy):
    """A client that leaves with a session lock held must not leak it to the next client
    of that server connection (the proxy's reset query, DISCARD ALL, unlocks)."""
    with connect(session_proxy) as a:
        a.execute("SELECT pg_advisory_lock(777)")
    # every server connection of the pool in turn: none may still hold the lock
    conns = [connect(session_proxy) for _ in range(session_proxy.pool_size)]
    try:
        for c in conns:
            assert c.execute("SELECT pg_try_advisory_lock(777)").fetchone() == (True,)
            c.execute("SELECT pg_advisory_unlock(777)")
    finally:
        for c in conns:
            c.close()


def test_listen_notify(session_proxy):
    with connect(session_proxy) as listener, connect(session_proxy) as sender:
        listener.execute("LISTEN drv_chan")
        for i in range(5):
            sender.execute("SELECT pg_notify('drv_chan', %s)", (f"msg{i}",))
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=5)]
        assert got == [("drv_chan", f"msg{i}") for i in range(5)]
        listener.execute("UNLISTEN *")


def test_listen_notify_psycopg2(session_proxy):
    import select

    listener = psycopg2.connect(session_proxy.dsn())
    sender = psycopg2.connect(session_proxy.dsn())
    try:
        listener.autocommit = sender.autocommit = True
        listener.cursor().execute("LISTEN drv_chan2")
        sender.cursor().execute("NOTIFY drv_chan2, 'hello'")
        deadline = time.monotonic() + 10
        while not listener.notifies and time.monotonic() < deadline:
            select.select([listener], [], [], 1)
            listener.poll()
        assert [(n.channel, n.payload) for n in listener.notifies] == [("drv_chan2", "hello")]
    finally:
        listener.close()
        sender.close()


def test_temp_table_across_transactions(session_proxy):
    with psycopg.connect(session_proxy.dsn()) as conn:
        conn.execute("CREATE TEMP TABLE drv_tmp (id int)")
        conn.commit()
        for i in range(10):
            conn.execute("INSERT INTO drv_tmp VALUES (%s)", (i,))
            conn.commit()
        assert conn.execute("SELECT count(*), sum(id) FROM drv_tmp").fetchone() == (10, 45)
        conn.commit()
    # and it is gone for the next client of the same server connections
    conns = [connect(session_proxy) for _ in range(session_proxy.pool_size)]
    try:
        for c in conns:
            assert c.execute("SELECT to_regclass('pg_temp.drv_tmp')").fetchone() == (None,)
    finally:
        for c in conns:
            c.close()


def test_with_hold_cursor(session_proxy):
    with psycopg.connect(session_proxy.dsn()) as conn:
        conn.execute("DECLARE drv_hold CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 100) g")
        conn.commit()
        got = []
        for _ in range(4):
            got += [r[0] for r in conn.execute("FETCH 25 FROM drv_hold").fetchall()]
            conn.commit()
        assert got == list(range(1, 101))
        conn.execute("CLOSE drv_hold")
        conn.commit()


def test_psycopg3_server_cursor_withhold(session_proxy):
    with psycopg.connect(session_proxy.dsn()) as conn:
        with conn.cursor("drv_p3_hold", withhold=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            conn.commit()
            first = [r[0] for r in cur.fetchmany(10)]
            conn.commit()
            rest = [r[0] for r in cur.fetchall()]
        assert first + rest == list(range(1, 1001))


@pytest.mark.parametrize("stmt", ["PREPARE drv_sqlprep (int) AS SELECT $1 * 10"])
def test_sql_prepare_execute(session_proxy, stmt):
    """SQL-level PREPARE/EXECUTE (not protocol-level) persists only in session mode."""
    with connect(session_proxy) as conn:
        conn.execute(stmt)
        for i in range(5):
            with conn.transaction():
                assert conn.execute(f"EXECUTE drv_sqlprep({i})").fetchone() == (i * 10,)
        conn.execute("DEALLOCATE drv_sqlprep")
