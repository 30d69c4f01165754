"""Per-client session state when clients share server connections.

In transaction mode with pool size 1 two clients run every transaction on the SAME
server connection, so each client's settings must be re-applied by the proxy whenever
the server changes hands. In session mode (pool size 2 here, so both clients can be
connected at once) the state trivially stays; it is the reference behaviour.
"""

from __future__ import annotations

import psycopg
import pytest

ROUNDS = 200
STATE_MODES = [("transaction", 1), ("session", 2)]


@pytest.fixture(params=STATE_MODES, ids=[m for m, _ in STATE_MODES])
def state_proxy(request, proxy_factory):
    mode, size = request.param
    return proxy_factory.get(mode, size, db="state")


@pytest.fixture(scope="module")
def schemas(pg):
    with psycopg.connect(pg.dsn("drv_state"), autocommit=True) as conn:
        for s in ("s_a", "s_b"):
            conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
            conn.execute(f"CREATE SCHEMA {s}")
            conn.execute(f"CREATE TABLE {s}.thing (v text)")
            conn.execute(f"INSERT INTO {s}.thing VALUES (%s)", (s,))
    return ("s_a", "s_b")


def _alternate(state_proxy, conns, check):
    """Runs ROUNDS transactions on each connection, alternating; returns backend pids."""
    pids = set()
    shared_rounds = 0
    for i in range(ROUNDS):
        round_pids = set()
        for name, conn in conns.items():
            with conn.transaction():
                check(name, conn, i)
                round_pids.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        pids |= round_pids
        shared_rounds += len(round_pids) == 1
    if state_proxy.mode == "transaction":
        # Pool size 1: both clients run on the same server connection. (The proxy may
        # replace that connection now and then, so not necessarily one pid overall.)
        assert shared_rounds >= ROUNDS * 0.9, f"clients shared a server in only {shared_rounds}/{ROUNDS} rounds"
    return pids


def test_timezone_and_application_name_per_client(state_proxy):
    wanted = {"a": ("Asia/Tokyo", "client-a"), "b": ("America/New_York", "client-b")}
    # prepare_threshold=None: no server-side prepared statements, so psycopg sends no
    # DEALLOCATE ALL after the ROLLBACK below (that path has its own tests in
    # test_edge_cases.py); this test is about settings only.
    conns = {k: psycopg.connect(state_proxy.dsn(), autocommit=True, prepare_threshold=None) for k in wanted}
    try:
        for k, conn in conns.items():
            tz, app = wanted[k]
            conn.execute(f"SET TimeZone = '{tz}'")
            conn.execute("SELECT set_config('application_name', %s, false)", (app,))

        def check(name, conn, i):
            tz, app = wanted[name]
            assert conn.execute("SHOW TimeZone").fetchone()[0] == tz, f"round {i} client {name}"
            assert conn.execute("SHOW application_name").fetchone()[0] == app, f"round {i} client {name}"
            # the setting really is in effect on the server, not only reported
            off = conn.execute("SELECT extract(timezone_hour FROM now())::int").fetchone()[0]
            assert (off == 9) if name == "a" else (off in (-4, -5))
            # psycopg's own view (from ParameterStatus) matches too
            assert conn.info.parameter_status("TimeZone") == tz
            assert conn.info.parameter_status("application_name") == app

        _alternate(state_proxy, conns, check)

        # a setting changed inside a transaction that rolls back does not stick
        a = conns["a"]
        with pytest.raises(psycopg.errors.DivisionByZero):
            with a.transaction():
                a.execute("SET TimeZone = 'Europe/Paris'")
                a.execute("SELECT 1/0")
        conns["b"].execute("SELECT 1")
        assert a.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo"

        # RESET goes back to the server default, for that client only
        a.execute("RESET TimeZone")
        default_tz = a.execute("SHOW TimeZone").fetchone()[0]
        assert default_tz != "Asia/Tokyo"
        assert conns["b"].execute("SHOW TimeZone").fetchone()[0] == "America/New_York"
        assert a.execute("SHOW TimeZone").fetchone()[0] == default_tz
    finally:
        for c in conns.values():
            c.close()


def test_search_path_from_startup_options(state_proxy, schemas):
    """options='-c search_path=X' is a startup setting: the proxy re-applies it on every
    server the client lands on."""
    conns = {s: psycopg.connect(state_proxy.dsn(options=f"-c search_path={s}"), autocommit=True) for s in schemas}
    try:
        def check(name, conn, i):
            assert conn.execute("SHOW search_path").fetchone()[0] == name, f"round {i}"
            assert conn.execute("SELECT v FROM thing").fetchone()[0] == name, f"round {i} client {name}"

        _alternate(state_proxy, conns, check)
    finally:
        for c in conns.values():
            c.close()


def test_search_path_list_from_startup_options(state_proxy, schemas):
    """The usual form, a LIST: options='-c search_path=s_a,public'.

    PostgreSQL (direct connection) shows `s_a,public` and resolves `thing` in s_a.
    Regression test: before 58b42f2 pgsidecar re-applied it as SET search_path TO
    's_a,public' - one schema named "s_a,public" - and `thing` was not found (42P01).
    """
    with psycopg.connect(state_proxy.dsn(options="-c search_path=s_a,public"), autocommit=True) as conn:
        assert conn.execute("SHOW search_path").fetchone()[0] == "s_a,public"
        assert conn.execute("SELECT v FROM thing").fetchone()[0] == "s_a"


def test_search_path_set_via_sql(state_proxy, schemas):
    # Carried in transaction mode since 58b42f2 (before: xfail "search_path SET via SQL is
    # not carried in transaction mode" - PostgreSQL 15 does not report search_path).
    conns = {s: psycopg.connect(state_proxy.dsn(), autocommit=True) for s in schemas}
    try:
        for s, conn in conns.items():
            conn.execute(f"SET search_path = {s}, public")

        def check(name, conn, i):
            assert conn.execute("SHOW search_path").fetchone()[0] == f"{name}, public", f"round {i}"
            assert conn.execute("SELECT v FROM thing").fetchone()[0] == name, f"round {i} client {name}"

        _alternate(state_proxy, conns, check)
    finally:
        for c in conns.values():
            c.close()


def test_unreported_set_does_not_leak_to_other_clients(state_proxy):
    """`SET statement_timeout` (not reported via ParameterStatus) by one client must not
    show up for another client."""
    # Before 58b42f2 (transaction mode, pool size 1) B saw A's 1234ms.
    with psycopg.connect(state_proxy.dsn(), autocommit=True) as a, \
            psycopg.connect(state_proxy.dsn(), autocommit=True) as b:
        a.execute("SET statement_timeout = 1234")
        assert a.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert b.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_sql_set_follows_transaction_outcome(state_proxy, schemas):
    """SQL SET of an unreported setting in the ways drivers issue it: inside a driver's
    implicit transaction (committed / rolled back), SET LOCAL, RESET."""
    with psycopg.connect(state_proxy.dsn()) as a, psycopg.connect(state_proxy.dsn(), autocommit=True) as b:
        def show_a():
            v = a.execute("SHOW search_path").fetchone()[0]
            a.commit()
            return v

        default = b.execute("SHOW search_path").fetchone()[0]
        a.execute("SET search_path = s_a, public")
        a.commit()
        b.execute("SELECT 1")  # the server passes through the other client
        assert show_a() == "s_a, public"
        assert b.execute("SHOW search_path").fetchone()[0] == default

        a.execute("SET search_path = s_b, public")
        a.rollback()
        b.execute("SELECT 1")
        assert show_a() == "s_a, public"

        a.execute("SET LOCAL search_path = s_b")
        assert a.execute("SELECT v FROM thing").fetchone()[0] == "s_b"
        a.commit()
        b.execute("SELECT 1")
        assert show_a() == "s_a, public"

        a.execute("RESET search_path")
        a.commit()
        b.execute("SELECT 1")
        assert show_a() == default
