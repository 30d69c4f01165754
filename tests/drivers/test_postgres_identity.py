"""Session mode looks like PostgreSQL itself to the client: the backend pid it is told is
its server's real one, and the parameters it is told are spelled as the server reports
them (psycopg's own suite checks both)."""

from __future__ import annotations

import psycopg
import pytest


def test_backend_pid_is_the_servers(session_proxy):
    with psycopg.connect(session_proxy.dsn(), autocommit=True) as conn:
        (real,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert conn.info.backend_pid == real


def test_terminate_own_backend_ends_the_session(session_proxy):
    with psycopg.connect(session_proxy.dsn(), autocommit=True) as victim, psycopg.connect(
        session_proxy.dsn(), autocommit=True
    ) as killer:
        (ok,) = killer.execute(
            "SELECT pg_terminate_backend(%s)", [victim.info.backend_pid]
        ).fetchone()
        assert ok is True
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")


def test_self_notify_carries_own_pid(session_proxy):
    with psycopg.connect(session_proxy.dsn(), autocommit=True) as conn:
        conn.execute("LISTEN pgsidecar_identity")
        conn.execute("NOTIFY pgsidecar_identity, 'hi'")
        gen = conn.notifies(timeout=5, stop_after=1)
        notes = list(gen)
        assert [n.payload for n in notes] == ["hi"]
        assert notes[0].pid == conn.info.backend_pid


@pytest.mark.parametrize("spelled, reported", [("utf8", "UTF8"), ("euc_jp", "EUC_JP")])
def test_client_encoding_reported_as_server_spells_it(proxy, spelled, reported):
    """Both modes (transaction mode learns the spelling from the login's settings check,
    and tells it to later clients with the same settings too)."""
    for _ in range(2):
        with psycopg.connect(proxy.dsn(client_encoding=spelled), autocommit=True) as conn:
            assert conn.pgconn.parameter_status(b"client_encoding").decode() == reported
            (shown,) = conn.execute("SHOW client_encoding").fetchone()
            assert shown == reported


def test_cancel_with_own_key_stops_query(session_proxy):
    """conn.cancel() (the blocking PQcancel path) and cancel_safe() (libpq 17's
    PQcancelCreate, when the libpq has it) both reach the real server."""
    import threading
    import time

    for how in ("cancel", "cancel_safe"):
        with psycopg.connect(session_proxy.dsn(), autocommit=True) as conn:
            if how == "cancel_safe" and psycopg.pq.version() < 170000:
                continue
            t = threading.Timer(0.5, getattr(conn, how))
            t.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            t.join()
            assert time.monotonic() - started < 10, how
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_quick_start_admits_the_roles_postgres_admits(proxy, direct):
    """`--upstream` with a URL without password (as here, in front of a trust cluster):
    any role logs in through the proxy as itself, as it would directly, and a role
    PostgreSQL refuses is refused with PostgreSQL's reason."""
    with psycopg.connect(direct(), autocommit=True) as d:
        d.execute("DROP ROLE IF EXISTS pgsc_alice")
        d.execute("DROP ROLE IF EXISTS pgsc_nologin")
        d.execute("CREATE ROLE pgsc_alice LOGIN PASSWORD 'secret'")
        d.execute("CREATE ROLE pgsc_nologin NOLOGIN")
    try:
        for password in ("secret", "anything"):  # a trust cluster ignores it; so does the proxy
            with psycopg.connect(proxy.dsn(user="pgsc_alice", password=password)) as c:
                row = c.execute("SELECT current_user, session_user, rolsuper FROM pg_roles"
                                " WHERE rolname = current_user").fetchone()
                assert row == ("pgsc_alice", "pgsc_alice", False)
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            psycopg.connect(proxy.dsn(user="pgsc_nologin"))
    finally:
        with psycopg.connect(direct(), autocommit=True) as d:
            d.execute("DROP ROLE IF EXISTS pgsc_nologin")
            # Session mode keeps pgsc_alice's server connection pooled: end it first.
            d.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE usename = 'pgsc_alice'")
            d.execute("DROP ROLE IF EXISTS pgsc_alice")
