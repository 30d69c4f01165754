"""Situations real applications put a pooler in: explicit BEGIN over several round
trips, clients dying inside a transaction, DISCARD ALL, notices, empty queries, big
values, startup parameters sent by asyncpg's server_settings."""

from __future__ import annotations

import socket
import threading

import asyncpg
import psycopg
import psycopg2
import pytest
from psycopg import errors as E


def connect(proxy, **kw) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), **kw)


def test_explicit_begin_spans_round_trips(proxy):
    """BEGIN sent alone (autocommit client, simple protocol): the server must stay with
    the client until COMMIT even while other clients run."""
    with connect(proxy, autocommit=True) as conn, connect(proxy, autocommit=True) as other:
        conn.execute("BEGIN")
        x1 = conn.execute("SELECT txid_current()").fetchone()[0]
        for i in range(5):
            other.execute("SELECT %s::int", (i,))
            assert conn.execute("SELECT txid_current()").fetchone()[0] == x1
        conn.execute("SAVEPOINT s1")
        with pytest.raises(E.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("ROLLBACK TO SAVEPOINT s1")
        assert conn.execute("SELECT txid_current()").fetchone()[0] == x1
        conn.execute("COMMIT")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_client_dies_inside_transaction(proxy):
    """A worker killed mid-transaction (socket closed, no Terminate): its transaction is
    rolled back and no lock or open transaction reaches the next clients."""
    with connect(proxy, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS edge_dies; CREATE TABLE edge_dies (id int PRIMARY KEY)")
        c.execute("INSERT INTO edge_dies VALUES (1)")
    victim = connect(proxy)
    victim.execute("UPDATE edge_dies SET id = 2 WHERE id = 1")
    victim.execute("SELECT pg_advisory_xact_lock(99)")
    socket.socket(fileno=victim.fileno()).close()  # abrupt close of the client socket
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    victim.close()

    conns = [connect(proxy, autocommit=True) for _ in range(proxy.pool_size)]
    try:
        for c in conns:
            c.execute("SET lock_timeout = '2s'")
            assert c.execute("SELECT pg_try_advisory_xact_lock(99)").fetchone() == (True,)
            assert c.execute("SELECT array_agg(id) FROM edge_dies").fetchone() == ([1],)
        with conns[0].transaction():
            conns[0].execute("UPDATE edge_dies SET id = 3 WHERE id = 1")  # row lock is free
        assert conns[1].execute("SELECT array_agg(id) FROM edge_dies").fetchone() == ([3],)
    finally:
        for c in conns:
            c.close()


ONE_SERVER = [("transaction", 1), ("session", 2)]


@pytest.fixture(params=ONE_SERVER, ids=[m for m, _ in ONE_SERVER])
def one_server_proxy(request, proxy_factory):
    """Transaction mode with pool size 1: every transaction of a client lands on the same
    server, so per-server bookkeeping bugs show deterministically."""
    mode, size = request.param
    return proxy_factory.get(mode, size, db="state")



def test_discard_all_with_prepared_statements(one_server_proxy):
    with connect(one_server_proxy, autocommit=True, prepare_threshold=0) as conn:
        for _ in range(3):
            assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)
            conn.execute("SET TimeZone = 'Asia/Tokyo'")
            conn.execute("DISCARD ALL")
            assert conn.execute("SELECT %s::int + 1", (2,)).fetchone() == (3,)
            assert conn.execute("SHOW TimeZone").fetchone()[0] != "Asia/Tokyo"


def test_deallocate_all_and_reprepare(one_server_proxy):
    with connect(one_server_proxy, autocommit=True, prepare_threshold=0) as conn:
        assert conn.execute("SELECT %s::text", ("a",)).fetchone() == ("a",)
        conn.execute("DEALLOCATE ALL")
        assert conn.execute("SELECT %s::text", ("b",)).fetchone() == ("b",)


def test_notices_and_empty_query(proxy):
    with connect(proxy, autocommit=True) as conn:
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
        assert notices == ["hello 42"]
        cur = conn.execute("")
        assert cur.pgresult.status == psycopg.pq.ExecStatus.EMPTY_QUERY
        assert conn.execute("SELECT 1").fetchone() == (1,)
    c2 = psycopg2.connect(proxy.dsn())
    try:
        c2.autocommit = True
        cur = c2.cursor()
        cur.execute("DO $$ BEGIN RAISE WARNING 'careful'; END $$")
        assert any("careful" in n for n in c2.notices)
    finally:
        c2.close()


def test_big_values(proxy):
    big = "x" * (8 * 1024 * 1024)
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT length(%s::text), md5(%s::text) = md5(repeat('x', 8388608))",
                            (big, big)).fetchone() == (len(big), True)
        assert conn.execute("SELECT repeat('y', 8388608)").fetchone()[0] == "y" * 8388608


async def test_asyncpg_server_settings(proxy, pg):
    """asyncpg sends server_settings as startup parameters (not via options=)."""
    conn = await asyncpg.connect(proxy.url(), timeout=15, command_timeout=30,
                                 server_settings={"application_name": "apg-app", "TimeZone": "Asia/Tokyo",
                                                  "statement_timeout": "12345"})
    other = await asyncpg.connect(proxy.url(), timeout=15, command_timeout=30)
    try:
        for _ in range(5):
            assert await other.fetchval("SHOW TimeZone") != "Asia/Tokyo"
            assert await conn.fetchval("SHOW application_name") == "apg-app"
            assert await conn.fetchval("SHOW TimeZone") == "Asia/Tokyo"
            assert await conn.fetchval("SHOW statement_timeout") == "12345ms"
            assert await other.fetchval("SHOW statement_timeout") == "0"
    finally:
        await conn.close()
        await other.close()


# ---------------------------------------------------------------------------
# SQL DEALLOCATE <name> of a protocol-level prepared statement
# ---------------------------------------------------------------------------


def _status(res) -> tuple[str, str]:
    state = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) or b""
    return psycopg.pq.ExecStatus(res.status).name, state.decode()


def test_sql_deallocate_of_protocol_prepared_statement(proxy):
    """Raw libpq calls (what psycopg 3 with libpq < 17, Rails' pg gem and others send):
    Parse "s1" / SQL `DEALLOCATE s1` / Parse "s1" with new text / execute.

    PostgreSQL: COMMAND_OK, COMMAND_OK, COMMAND_OK, returns the NEW statement's row.
    Regression test: before d45097e pgsidecar forwarded `DEALLOCATE s1` to a server that
    knows the statement as pgsc_<hash> (26000) and kept the name (next Parse: 42P05).
    """
    with connect(proxy, autocommit=True) as conn:
        pgc = conn.pgconn
        assert _status(pgc.prepare(b"s1", b"SELECT 1")) == ("COMMAND_OK", "")
        assert _status(pgc.exec_(b"DEALLOCATE s1")) == ("COMMAND_OK", "")
        assert _status(pgc.prepare(b"s1", b"SELECT 2")) == ("COMMAND_OK", "")
        res = pgc.exec_prepared(b"s1", [])
        assert _status(res) == ("TUPLES_OK", "") and res.get_value(0, 0) == b"2"


def test_psycopg3_prepared_eviction_via_sql_deallocate(proxy, monkeypatch):
    """psycopg 3 linked to libpq < 17 (the `psycopg[c]` / pure-python install on a distro
    with libpq 15/16) evicts statements past prepared_max with SQL `DEALLOCATE _pg3_N`.
    Emulated here by turning off psycopg's libpq-17 Close path."""
    import psycopg._connection_base as cb

    if not hasattr(cb, "_HAS_SEND_CLOSE"):
        pytest.skip("psycopg internals changed: cannot force the DEALLOCATE path")
    monkeypatch.setattr(cb, "_HAS_SEND_CLOSE", False)
    with connect(proxy, autocommit=True, prepare_threshold=0) as conn:
        conn.prepared_max = 5
        for rnd in range(3):
            for q in range(20):
                assert conn.execute(f"SELECT %s::int + {q}", (rnd,)).fetchone() == (rnd + q,)


async def test_asyncpg_server_settings_search_path_list(proxy, pg):
    with psycopg.connect(pg.dsn(proxy.dbname), autocommit=True) as c:
        c.execute("CREATE SCHEMA IF NOT EXISTS edge_s; DROP TABLE IF EXISTS edge_s.only_here; "
                  "CREATE TABLE edge_s.only_here (v int); INSERT INTO edge_s.only_here VALUES (7)")
    conn = await asyncpg.connect(proxy.url(), timeout=15, command_timeout=30,
                                 server_settings={"search_path": "edge_s,public"})
    try:
        for _ in range(3):
            assert await conn.fetchval("SHOW search_path") == "edge_s,public"
            assert await conn.fetchval("SELECT v FROM only_here") == 7
    finally:
        await conn.close()


@pytest.mark.parametrize("reset", [b"DEALLOCATE ALL", b"DISCARD ALL"], ids=["deallocate_all", "discard_all"])
def test_extended_protocol_reset_statements(one_server_proxy, reset):
    """Minimal repro with raw libpq calls, one server: Parse "s1" "SELECT $1::text"/Sync,
    Bind/Execute s1/Sync; Parse ""(reset)/Bind/Execute/Sync (extended protocol); Parse
    "s1" again/Sync; Bind/Execute s1/Sync. PostgreSQL: every step succeeds."""
    with connect(one_server_proxy, autocommit=True) as conn:
        pgc = conn.pgconn
        assert _status(pgc.prepare(b"s1", b"SELECT $1::text")) == ("COMMAND_OK", "")
        assert _status(pgc.exec_prepared(b"s1", [b"a"])) == ("TUPLES_OK", "")
        assert _status(pgc.exec_params(reset, [])) == ("COMMAND_OK", "")
        assert _status(pgc.prepare(b"s1", b"SELECT $1::text")) == ("COMMAND_OK", "")
        res = pgc.exec_prepared(b"s1", [b"b"])
        assert _status(res) == ("TUPLES_OK", "") and res.get_value(0, 0) == b"b"


# ---------------------------------------------------------------------------
# statements the proxy answers itself must not pin a server
# ---------------------------------------------------------------------------


def _other_client_gets_through(proxy, holder) -> object:
    """Runs SELECT 1 on a second client; returns its result, or the string 'blocked' if it
    has not finished after 3 s (then closes `holder`, which frees the server)."""
    other = psycopg.connect(proxy.dsn(), autocommit=True)
    res: dict = {}

    def go():
        try:
            res["v"] = other.execute("SELECT 1").fetchone()
        except Exception as e:  # noqa: BLE001
            res["v"] = repr(e)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(3)
    blocked = th.is_alive()
    if blocked:
        holder.close()
        th.join(10)
    other.close()
    return "blocked" if blocked else res["v"]


@pytest.mark.parametrize("stmt", [b"DEALLOCATE ALL", b"DEALLOCATE s1"], ids=["all", "name"])
def test_locally_answered_deallocate_releases_server(one_server_proxy, stmt):
    """Minimal repro, pool size 1: client A Parse "s1"/Sync, then Query `DEALLOCATE ...`
    (A idle afterwards); client B Query `SELECT 1`. PostgreSQL/expected: B runs at once.
    Observed: B waits until A disconnects (or gets 53300 after query_wait_timeout)."""
    a = connect(one_server_proxy, autocommit=True)
    try:
        assert _status(a.pgconn.prepare(b"s1", b"SELECT 1")) == ("COMMAND_OK", "")
        res = a.pgconn.exec_(stmt)
        assert _status(res) == ("COMMAND_OK", "")
        assert a.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert _other_client_gets_through(one_server_proxy, a) == (1,)
    finally:
        a.close()


def test_psycopg3_rollback_with_prepared_statements_releases_server(one_server_proxy):
    """psycopg 3 defaults: once a query ran 5 times it is prepared; after a ROLLBACK psycopg
    sends `DEALLOCATE ALL` (simple Query). That client must not keep the server."""
    a = connect(one_server_proxy, autocommit=True)
    try:
        for i in range(6):
            assert a.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        with pytest.raises(E.DivisionByZero):
            with a.transaction():
                a.execute("SELECT 1/0")
        assert _other_client_gets_through(one_server_proxy, a) == (1,)
    finally:
        a.close()


def test_deallocate_all_command_tag(one_server_proxy):
    with connect(one_server_proxy, autocommit=True) as a:
        a.pgconn.prepare(b"s1", b"SELECT 1")
        assert a.pgconn.exec_(b"DEALLOCATE ALL").command_status == b"DEALLOCATE ALL"
